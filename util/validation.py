"""Checks of user-given values shared by every entry point (main_fractalgen.py,
demo/sample.py, util.fid_stats, the notebook), so a bad flag gets the same one-sentence
error everywhere, before any heavy work starts. The number and sampling checks live in
models.checks (configuration files and checkpoints are checked with them too) and are
exported here as well; FID files are checked by loading them (util.fid.load_stats,
util.fid.check_inception_weights).

Each check raises `UserInputError` (a ValueError) whose message names the flag, the bad
value and what to give instead; `flag` is how the value is called where it came from
("--temperature" on a command line, "temperature" in Python)."""
import torch

from models.checks import (check_sampling_args, finite_nonnegative, finite_positive,  # noqa: F401 (shared checks)
                           parse_num_iter_list, positive_int)
from models.config import CONFIGS, get_config, is_config_file
from models.errors import UserInputError


def check_model(value, flag="--model"):
    """A --model value: a name of models.CONFIGS, or a JSON configuration file, which is read
    and checked here (before anything heavy). Returns its record."""
    if not is_config_file(value) and value not in CONFIGS:
        raise UserInputError(f"{flag} {value!r} is neither a model name ({', '.join(CONFIGS)}) nor a JSON "
                             f"configuration file (FILE.json)")
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
