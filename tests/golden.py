"""Access to the golden fixtures made by the official implementation (tests/fixtures/)."""
import functools
import json
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"


@functools.lru_cache(maxsize=None)
def _load(name):
    return torch.load(FIXTURES / f"{name}.pth", weights_only=True)


def load_case(name):
    """A golden case dict (cached; tensors are shared, so tests must not modify them)."""
    return _load(name)


@functools.lru_cache(maxsize=None)
def manifest():
    return json.loads((FIXTURES / "manifest.json").read_text())
