"""Checks of user-given values shared by every entry point (main_fractalgen.py,
demo/sample.py, util.fid_stats, the notebook), so a bad flag gets the same one-sentence
error everywhere, before any heavy work starts. The number and sampling checks live in
models.checks (configuration files and checkpoints are checked with them too) and are
exported here as well; FID files are checked by loading them (util.fid.load_stats,
util.fid.check_inception_weights).

Each check raises `UserInputError` (a ValueError) whose message names the flag, the bad
value and what to give instead; `flag` is how the value is called where it came from
("--temperature" on a command line, "temperature" in Python)."""
import difflib

import torch

from models.checks import (check_sampling_args, finite_nonnegative, finite_positive,  # noqa: F401 (shared checks)
                           parse_num_iter_list, positive_int)
from models.config import CONFIGS, get_config, is_config_file
from models.errors import UserInputError


def check_model(value, flag="--model"):
    """A --model value: a name of models.CONFIGS, or a JSON configuration file, which is read
    and checked here (before anything heavy). Returns its record."""
    if not is_config_file(value) and value not in CONFIGS:
        close = difflib.get_close_matches(str(value), list(CONFIGS), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UserInputError(f"{flag} {value!r} is neither a model name ({', '.join(CONFIGS)}) nor a JSON "
                             f"configuration file (FILE.json){hint}")
    try:
        return get_config(value)
    except UserInputError as e:
        raise UserInputError(f"{flag} {e}") from None


def ema_rate(flag, value):
    """The decay of a moving average per step (--ema_rate): a number strictly between 0 and 1."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{flag} must be a number, got {value!r}") from None
    if not 0 < x < 1:  # NaN fails too
        raise UserInputError(f"{flag} must be a number strictly between 0 and 1 (the share of the average kept at "
                             f"each step, e.g. 0.9999), got {value}")
    return x


def parse_value_list(flag, text, check):
    """'1,2,3' -> [1.0, 2.0, 3.0] (each passed through `check(flag, value)`, e.g.
    finite_positive), duplicates dropped, order kept; an empty list or a non-number is
    refused with one sentence."""
    items = [item.strip() for item in str(text).split(",")]
    if not any(items):
        raise UserInputError(f"{flag} {text!r} is empty; give comma-separated values, e.g. {flag} 1,2,3")
    values = []
    for item in items:
        if not item:
            raise UserInputError(f"{flag} {text!r} has an empty entry; give comma-separated values, e.g. 1,2,3")
        value = check(flag, item)
        if value not in values:
            values.append(value)
    return values


def parse_sampling_grid(cfg=None, temperature=None, num_iter_lists=None):
    """The grid of a sampling sweep: cfg '1,2,3' (each >= 0), temperature '0.9,1.0' (each
    > 0) and num_iter_lists ['64,16', '32,8'] (each a list of positive ints); None leaves
    that axis to the caller. Returns (cfgs, temperatures, num_iter_lists), lists or None."""
    cfgs = parse_value_list("--cfg", cfg, finite_nonnegative) if cfg is not None else None
    temperatures = parse_value_list("--temperature", temperature, finite_positive) if temperature is not None else None
    if num_iter_lists is not None:
        if not num_iter_lists:
            raise UserInputError("--num_iter_list is empty; give one or more lists, e.g. --num_iter_list 64,16 32,16")
        parsed = []
        for text in num_iter_lists:
            value = parse_num_iter_list(text)
            if value is None:
                raise UserInputError("--num_iter_list has an empty entry; give lists such as 64,16")
            if value not in parsed:
                parsed.append(value)
        num_iter_lists = parsed
    return cfgs, temperatures, num_iter_lists


def check_num_images(num_images, class_num, flag="--num_images"):
    """At least 2 images (FID needs a covariance), a multiple of class_num (class-balanced)."""
    positive_int(flag, num_images)
    if num_images % class_num:
        raise UserInputError(f"{flag} {num_images} is not divisible by class_num {class_num}; class-balanced "
                             f"generation needs a multiple, e.g. {max(1, num_images // class_num) * class_num}")
    if num_images < 2:
        raise UserInputError(f"{flag} {num_images}: FID needs at least 2 images")
    return num_images


def check_device(name, flag="--device"):
    """'cpu', 'cuda', 'cuda:N' (or 'auto'/None: CUDA when present) -> torch.device, checking
    that the device exists on this machine."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UserInputError(f"{flag} {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"{flag} {name} was requested but CUDA is not available; pass {flag} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserInputError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                                 f"pick cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type not in ("cpu", "mps"):
        raise UserInputError(f"{flag} {name}: only cpu and cuda devices are supported")
    return device


# What the fast-sampler flags accept (demo/sample.py --fast, main_fractalgen.py
# --fast_sampling, the benchmark's --fast) and the generate(fast=...) value each means.
FAST_SAMPLERS = {"off": False, "compiled": True, "frozen": "frozen"}
FAST_HELP = ("compiled: static-shape steps under torch.compile, cached on disk for the next run; frozen (CPU): "
             "also the weights frozen into the graphs, faster once compiled but compiled in every process "
             "(long jobs)")


def fast_sampler(value):
    """A --fast / --fast_sampling value (a name of FAST_SAMPLERS, or a bool as older
    Namespaces hold it) -> the generate(fast=...) argument."""
    if isinstance(value, bool):
        return value
    if value not in FAST_SAMPLERS:
        raise UserInputError(f"the fast sampler must be one of {', '.join(FAST_SAMPLERS)}, got {value!r}")
    return FAST_SAMPLERS[value]
