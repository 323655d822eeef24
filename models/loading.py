"""`load_model`: the right FractalGen for a checkpoint, in one call.

    model = models.load_model("pretrained_models/fractalmar_in64")   # or the file, or just the name
    images = model.generate([207, 360])                              # the checkpoint's sampling settings

It takes an official checkpoint (a file, its folder, or the model's name; `download=True`
fetches a missing one), a checkpoint main_fractalgen.py wrote, or the quick start's. The
file is read with `torch.load(weights_only=True)` (util.checkpoint). The architecture comes
from `model=`, else the checkpoint's 'args', else the folder name
(pretrained_models/<name>/); class_num is read from the class embedding, and the weights
load strictly.

Sampling settings: a checkpoint may store the ones that suit it under 'sampling' (the quick
start does); otherwise the model's DEFAULT_SAMPLING apply. They become the defaults of
`model.generate` (see FractalGen.sampling_config).
"""
import argparse
import os

from util.checkpoint import CHECKPOINT_NAME, checkpoint_class_num, load_checkpoint
from util.download import PRETRAINED_URLS, download_pretrained
from util.misc import UserInputError
from util.validation import check_sampling_args, parse_num_iter_list

from .fractalgen import DEFAULT_SAMPLING, MODELS, SAMPLING_KEYS, create_model

# 'args' entries of a training checkpoint that shape the architecture besides the model
# name (dropout, learning rate and paths do not matter for sampling)
ARCH_ARGS = ("num_conds", "guiding_pixel")


def official_target(path_or_name, root="pretrained_models"):
    """(model name, checkpoint path) when `path_or_name` names an official model -- the bare
    name, its folder (pretrained_models/fractalmar_in64) or the file in it; else (None, None)."""
    path = os.path.normpath(os.fspath(path_or_name))
    if path in PRETRAINED_URLS:
        return path, os.path.join(root, path, CHECKPOINT_NAME)
    folder, base = os.path.split(path)
    if base in PRETRAINED_URLS:
        return base, os.path.join(path, CHECKPOINT_NAME)
    if base == CHECKPOINT_NAME and os.path.basename(folder) in PRETRAINED_URLS:
        return os.path.basename(folder), path
    return None, None


def resolve_checkpoint(path_or_name, download=False, root="pretrained_models"):
    """File, folder or official model name -> path of an existing checkpoint file. A missing
    official checkpoint is downloaded when `download`, else the error says how to get it."""
    path = os.fspath(path_or_name)
    file = os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path
    if os.path.isfile(file):
        return file
    if path in MODELS and os.path.isfile(os.path.join(root, path, CHECKPOINT_NAME)):  # a name: root/<name>/
        return os.path.join(root, path, CHECKPOINT_NAME)
    name, target = official_target(path, root)
    if name is None:
        raise UserInputError(f"checkpoint {path!r} not found; pass a checkpoint file, a folder holding "
                             f"{CHECKPOINT_NAME}, or an official model name ({', '.join(PRETRAINED_URLS)})")
    if not download:
        raise UserInputError(f"{target} is not there yet; add --download (download=True in Python) or run "
                             f"`python util/download.py --model {name}`")
    return download_pretrained(name, os.path.dirname(os.path.dirname(target)))


def checkpoint_args(ckpt):
    """The checkpoint's 'args' (an argparse.Namespace in official and our files) as a dict."""
    args = ckpt.get("args") or {}
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)


def infer_model_name(path, args, model=None):
    """`model`, else the checkpoint's args.model, else the folder name."""
    name = model or args.get("model") or os.path.basename(os.path.dirname(os.path.abspath(path)))
    if name not in MODELS:
        raise UserInputError(f"cannot tell the architecture of {path} (got {name!r}); pass --model "
                             f"(model= in Python) with one of {', '.join(MODELS)}")
    return name


def checkpoint_sampling(ckpt, name, path):
    """The model's DEFAULT_SAMPLING, overridden by the settings stored with the checkpoint
    (validated: a file is data from outside)."""
    settings = dict(DEFAULT_SAMPLING.get(name, {}))
    stored = ckpt.get("sampling") or {}
    if not isinstance(stored, dict) or set(stored) - set(SAMPLING_KEYS):
        raise UserInputError(f"{path}: its 'sampling' entry must be a dict of {', '.join(SAMPLING_KEYS)}")
    settings.update({k: v for k, v in stored.items() if v is not None})
    check_sampling_args(settings.get("temperature"), settings.get("cfg"), settings.get("filter_threshold"),
                        prefix=f"{path}: sampling ")
    if settings.get("num_iter_list") is not None:
        settings["num_iter_list"] = parse_num_iter_list(tuple(settings["num_iter_list"]),
                                                        flag=f"{path}: sampling num_iter_list")
    return settings


def load_model(path_or_name, model=None, device="cpu", download=False, root="pretrained_models"):
    """Build the model a checkpoint holds and load its weights strictly.

    path_or_name: a checkpoint file, a folder holding checkpoint-last.pth, or an official
    model name (looked up in `root`; fetched there when `download`). model: the
    configuration name, when neither the checkpoint's args nor the folder tell it.
    Returns the FractalGen in eval mode on `device`, with `model_name` and
    `sampling_defaults` set. Bad input raises UserInputError (util.download.DownloadError
    for a failed download) with one sentence."""
    path = resolve_checkpoint(path_or_name, download=download, root=root)
    ckpt = load_checkpoint(path)
    args = checkpoint_args(ckpt)
    name = infer_model_name(path, args, model)
    kwargs = {k: args[k] for k in ARCH_ARGS if args.get(k) is not None}
    class_num = checkpoint_class_num(ckpt)
    if class_num is not None:
        kwargs["class_num"] = class_num
    try:
        net = create_model(name, **kwargs)
        net.load_state_dict(ckpt["model"], strict=True)
    except ValueError as e:  # a CheckpointMismatchError, or arguments the factory rejects
        raise UserInputError(f"{path} does not fit model {name}: {e}") from None
    net.sampling_defaults = checkpoint_sampling(ckpt, name, path)
    return net.to(device).eval()
