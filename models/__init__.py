"""Fractal generative models: FractalGen and its AR / MAR / per-pixel building blocks.

`load_model(path_or_name)` builds the right model from a checkpoint; `create_model(name)`
builds an untrained one."""
from .ar import AR
from .fractalgen import (DEFAULT_SAMPLING, MODELS, CheckpointMismatchError, FractalGen, create_model,
                         fractalar_in64, fractalar_tiny, fractalmar_base_in256, fractalmar_huge_in256,
                         fractalmar_in64, fractalmar_large_in256, fractalmar_tiny, from_uint8, to_uint8)
from .loading import load_model
from .mar import MAR, fixed_masking
from .pixelloss import PixelLoss

__all__ = [
    "AR", "MAR", "PixelLoss", "FractalGen", "MODELS", "DEFAULT_SAMPLING", "CheckpointMismatchError",
    "create_model", "load_model", "fixed_masking", "to_uint8", "from_uint8",
    "fractalar_in64", "fractalmar_in64", "fractalmar_base_in256", "fractalmar_large_in256",
    "fractalmar_huge_in256", "fractalar_tiny", "fractalmar_tiny",
]
