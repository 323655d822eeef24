"""Fractal generative models: FractalGen and its AR / MAR / per-pixel building blocks.

`create_model(name_or_json_or_record)` builds an untrained model from a configuration
record (models.config: the named models are rows of `CONFIGS`); `load_model(path_or_name)`
builds the right model from a checkpoint and loads its weights. This package imports
nothing from util/."""
from .ar import AR
from .config import (CONFIGS, DEFAULT_SAMPLING, MODELS, check_config, create_model, fractalar_in64, fractalar_tiny,
                     fractalmar_base_in256, fractalmar_huge_in256, fractalmar_in64, fractalmar_large_in256,
                     fractalmar_tiny, get_config)
from .errors import UserInputError
from .fractalgen import CheckpointMismatchError, FractalGen, from_uint8, to_uint8
from .loading import load_checkpoint, load_model
from .mar import MAR, fixed_masking
from .pixelloss import PixelLoss

__all__ = [
    "AR", "MAR", "PixelLoss", "FractalGen", "CONFIGS", "MODELS", "DEFAULT_SAMPLING", "CheckpointMismatchError",
    "UserInputError", "create_model", "get_config", "check_config", "load_model", "load_checkpoint",
    "fixed_masking", "to_uint8", "from_uint8",
    "fractalar_in64", "fractalmar_in64", "fractalmar_base_in256", "fractalmar_large_in256",
    "fractalmar_huge_in256", "fractalar_tiny", "fractalmar_tiny",
]
