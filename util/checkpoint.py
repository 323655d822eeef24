"""Checkpoints: atomic writes and safe loads.

A checkpoint is the official dict {'model', 'optimizer', 'epoch', 'scaler', 'args'} with
`args` an argparse.Namespace, so official files and ours are interchangeable. Writing goes
to a temporary file in the same folder that is renamed over the old checkpoint only once
complete: a crash mid-write leaves the previous checkpoint intact. Loading uses
`torch.load(weights_only=True)`, which refuses arbitrary pickled code; argparse.Namespace is
the only class allowed besides tensors and plain containers.
"""
import argparse
import os
import pickle
import re

import torch

from util.misc import UserInputError

CHECKPOINT_NAME = "checkpoint-last.pth"
SAFE_GLOBALS = [argparse.Namespace]


def checkpoint_path(folder_or_file):
    """--resume accepts a folder (holding checkpoint-last.pth) or the file itself."""
    if os.path.isfile(folder_or_file):
        return folder_or_file
    return os.path.join(folder_or_file, CHECKPOINT_NAME)


def save_checkpoint(state, path):
    """torch.save to `path` atomically: temp file in the same folder, fsync, rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows when on the same filesystem
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_folder(folder)


def _fsync_folder(folder):
    """Persist the rename itself (POSIX only; Windows cannot open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def safe_load(path, what, allowed=()):
    """torch.load(path, weights_only=True) on the CPU, allowing only tensors, plain
    containers and the classes in `allowed`. A missing, corrupt or unsafe file raises
    UserInputError with one sentence; `what` names the file in it (e.g. "checkpoint")."""
    if not os.path.isfile(path):
        raise UserInputError(f"{what} {path} does not exist")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message goes on to suggest weights_only=False: never pass that advice on
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        culprit = f" (it references {found.group(1)})" if found else ""
        kinds = ", ".join(["tensors", "plain containers", *(f"{c.__module__}.{c.__qualname__}" for c in allowed)])
        raise UserInputError(f"refusing to load {what} {path}: it holds objects other than {kinds}{culprit}, "
                             f"which could run code when unpickled; use a file that holds only those") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        text = str(e).strip()
        raise UserInputError(f"cannot read {what} {path} (truncated or not a PyTorch file?): "
                             f"{text.splitlines()[0] if text else type(e).__name__}") from None


def load_checkpoint(path):
    """Load a checkpoint dict on the CPU with weights_only=True (argparse.Namespace
    allowed). Raises UserInputError with one sentence for a missing, corrupt or unsafe file."""
    if not os.path.isfile(path):
        raise UserInputError(f"no checkpoint at {path}; pass --resume with the folder that holds "
                             f"{CHECKPOINT_NAME} (or the file itself)")
    ckpt = safe_load(path, "checkpoint", SAFE_GLOBALS)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserInputError(f"{path} is not a FractalGen checkpoint: expected a dict with a 'model' "
                             f"entry holding the state_dict")
    return ckpt


def checkpoint_class_num(ckpt):
    """Number of classes of the model in a checkpoint (rows of the class embedding), or None."""
    weight = ckpt["model"].get("class_emb.weight")
    return int(weight.shape[0]) if weight is not None else None


def checkpoint_model_name(ckpt):
    """The --model a checkpoint was trained with, when its args say so."""
    return getattr(ckpt.get("args"), "model", None)
