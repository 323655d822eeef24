"""Checks of user-given values shared by every entry point (main_fractalgen.py,
demo/sample.py, util.fid_stats, the notebook), so a bad flag gets the same one-sentence
error everywhere, before any heavy work starts. Files are checked by loading them
(safely: weights_only=True), not just by looking for them.

Each check raises `UserInputError` (a ValueError) whose message names the flag, the bad
value and what to give instead; `flag` is how the value is called where it came from
("--temperature" on a command line, "temperature" in Python)."""
import math

import torch

from util.misc import UserInputError


def _number(flag, value):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{flag} must be a number, got {value!r}") from None


def finite_positive(flag, value):
    """A finite float > 0 (temperatures, learning rates)."""
    x = _number(flag, value)
    if not math.isfinite(x) or x <= 0:
        raise UserInputError(f"{flag} must be a finite number above 0, got {value}")
    return x


def finite_nonnegative(flag, value):
    """A finite float >= 0 (guidance scales, thresholds)."""
    x = _number(flag, value)
    if not math.isfinite(x) or x < 0:
        raise UserInputError(f"{flag} must be a finite number of 0 or more, got {value}")
    return x


def positive_int(flag, value, minimum=1):
    """A whole number >= minimum (an int, or a float or string holding one; not a bool)."""
    if isinstance(value, bool):
        raise UserInputError(f"{flag} must be a whole number, got {value!r}")
    if not isinstance(value, int):
        try:
            if float(value) != int(value):
                raise ValueError
            value = int(value)
        except (TypeError, ValueError, OverflowError):
            raise UserInputError(f"{flag} must be a whole number, got {value!r}") from None
    if value < minimum:
        raise UserInputError(f"{flag} must be at least {minimum}, got {value}")
    return value


def parse_num_iter_list(text, flag="--num_iter_list"):
    """'64,16' (or a tuple/list, or None for the model's default) -> tuple of positive ints."""
    if text is None or isinstance(text, (tuple, list)):
        values = tuple(text) if text else None
        if values is not None and any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise UserInputError(f"{flag} {list(values)} must hold positive integers, e.g. 64,16")
        return values
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise UserInputError(f"{flag} {text!r} must be comma-separated integers, e.g. 64,16") from None
    if any(v < 1 for v in values):
        raise UserInputError(f"{flag} {text!r} must hold positive integers, e.g. 64,16")
    return values


def check_sampling_args(temperature=None, cfg=None, filter_threshold=None, prefix="--"):
    """Temperature finite and > 0, cfg finite and >= 0, filter_threshold finite in [0, 1).
    None means 'not given' and is skipped. Returns the values as floats (or None)."""
    if temperature is not None:
        temperature = finite_positive(f"{prefix}temperature", temperature)
    if cfg is not None:
        cfg = finite_nonnegative(f"{prefix}cfg", cfg)
    if filter_threshold is not None:
        filter_threshold = finite_nonnegative(f"{prefix}filter_threshold", filter_threshold)
        if filter_threshold >= 1:
            raise UserInputError(f"{prefix}filter_threshold must be below 1 (a probability cut-off), "
                                 f"got {filter_threshold}")
    return temperature, cfg, filter_threshold


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


def check_fid_stats(path):
    """Load FID reference statistics (.npz) and check them: mu (2048,) and sigma
    (2048, 2048), all finite. Returns (mu, sigma) float64."""
    from util import fid
    return fid.load_stats(path)


def check_inception_weights(path=None):
    """Load the Inception weights (`path`, or None: torch-fidelity's file, downloaded once
    into the torch hub cache) with weights_only=True and check every key and shape against
    torch-fidelity's Inception-v3 (built on the CPU and dropped again, about a second)."""
    from util import fid
    fid.build_inception(torch.device("cpu"), path)


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
