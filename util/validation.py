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
import os

import torch

from models.checks import (check_sampling_args, finite_nonnegative, finite_positive,  # noqa: F401 (shared checks)
                           fraction, number_in, parse_num_iter_list, positive_int)
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
    elif device.type == "cpu":
        if device.index not in (None, 0):
            raise UserInputError(f"{flag} {name}: the CPU takes no device number; pass {flag} cpu (--threads "
                                 f"sets how many cores it uses)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserInputError(f"{flag} {name}: this build of torch cannot use MPS (Apple GPUs) on this machine; "
                                 f"pass {flag} cpu" + (" or cuda" if torch.cuda.is_available() else ""))
    else:
        raise UserInputError(f"{flag} {name}: only cpu and cuda devices are supported")
    return device


# Ranges of main_fractalgen.py's numeric flags, all checked before anything is read or
# written -- also those a model ignores (AR levels keep their fixed dropout), so a typo
# never passes silently. Whole numbers: (lowest, highest, why); None: not given, skipped.
# (--num_conds and --img_size are the model's to check: models.checks.check_architecture
# and check_img_size, on the meta device, before anything is read.)
INT_LIMIT = 2 ** 31 - 1  # counts beyond a C int overflow inside torch and numpy
_COUNT = (1, INT_LIMIT, " (a C int)")
MAIN_INT_FLAGS = {
    "batch_size": _COUNT, "epochs": _COUNT, "gen_bsz": _COUNT, "num_images": _COUNT, "nll_bsz": _COUNT,
    "nll_forward_number": _COUNT, "eval_freq": _COUNT, "save_last_freq": _COUNT, "img_size": _COUNT,
    "world_size": _COUNT,
    "start_epoch": (0, INT_LIMIT, " (a C int)"), "warmup_epochs": (0, INT_LIMIT, " (a C int)"),
    "save_every_steps": (0, INT_LIMIT, " (a C int; 0: off)"),
    "seed": (0, 2 ** 63 - 1, " (torch seeds are 64-bit; the data order adds the epoch)"),
    "class_num": (1, 1_000_000, " (one embedding row per class)"),
    "requeue_exit_code": (0, 255, " (a process exit status)"),
    "local_rank": (-1, INT_LIMIT, ""),
}
# Probabilities: whether 1 is allowed (models.checks.fraction, as in configuration files).
MAIN_PROBABILITY_FLAGS = {"attn_dropout": False, "proj_dropout": False, "label_drop_prob": True}
# Other numbers: (low, high, interval, why). Learning rates, decay, clipping, the red
# channel's loss weight and the sampling settings have their own checks (finite, positive
# or not negative).
MINUTES_PER_YEAR = 525_600
MAIN_FLOAT_FLAGS = {
    "save_every_min": (0, MINUTES_PER_YEAR, "[]", " (minutes, at most a year; 0: off)"),
    "dist_timeout": (1e-4, 1e8, "[]", " (minutes; the backends count whole milliseconds, and overflow int64 "
                                      "nanoseconds beyond 1e8 minutes)"),
}


_LR_WHY = " (AdamW moves every weight by about the learning rate at each step)"


def _at_most(flag, x, high, why):
    if x > high:
        raise UserInputError(f"{flag} must be at most {high:g}{why}, got {x:g}")
    return x


def check_learning_rate(lr, weight_decay, origin="--lr"):
    """The learning rate a run trains with (`origin` says where it came from, e.g.
    "--blr 0.5 x 2048 / 256") at most 1, and AdamW's decoupled weight decay, which
    multiplies every weight by (1 - lr x weight_decay) at each step, below 1/lr."""
    if lr > 1:
        raise UserInputError(f"the learning rate {lr:g} ({origin}) must be at most 1{_LR_WHY}")
    if lr * weight_decay >= 1:
        raise UserInputError(f"--weight_decay {weight_decay:g} with learning rate {lr:g} ({origin}) would multiply "
                             f"every weight by 1 - lr x weight_decay <= 0 at each step; use a weight decay below "
                             f"1/lr = {1 / lr:g}")


# Worker processes (DataLoader workers, decoding pools): more than a few per core cannot
# read faster, and each one is a process with its own memory -- a huge count forks until
# the machine runs out of memory. The bound: WORKERS_PER_CORE per usable core, at least
# MIN_WORKER_LIMIT (so the official default of 10 passes on a laptop).
WORKERS_PER_CORE = 4
MIN_WORKER_LIMIT = 16


def usable_cpus():
    """The CPU cores this process may run on (its affinity mask, e.g. a SLURM allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_count(flag, value, minimum=0):
    """A number of worker processes: a whole number >= minimum and at most
    max(MIN_WORKER_LIMIT, WORKERS_PER_CORE x usable cores), checked before any is started."""
    n = positive_int(flag, value, minimum=minimum)
    cpus = usable_cpus()
    limit = max(MIN_WORKER_LIMIT, WORKERS_PER_CORE * cpus)
    if n > limit:
        raise UserInputError(f"{flag} {n} is more worker processes than this machine can use: it gives this process "
                             f"{cpus} CPU core(s), so at most {limit} (each worker is a process with its own memory); "
                             f"pass {flag} {min(cpus, limit)}")
    return n


def check_main_flags(args):
    """Every numeric flag of main_fractalgen.py in its range (MAIN_INT_FLAGS,
    MAIN_PROBABILITY_FLAGS, MAIN_FLOAT_FLAGS), the learning rates, the sampling settings
    and the device: one sentence for the first bad one (flags left at None, "take the
    configuration's", are skipped). Converts args.num_iter_list to a tuple."""
    for name, (low, high, why) in MAIN_INT_FLAGS.items():
        if getattr(args, name, None) is not None:
            positive_int(f"--{name}", getattr(args, name), minimum=low, maximum=high, why=why)
    worker_count("--num_workers", args.num_workers)
    for name, one_allowed in MAIN_PROBABILITY_FLAGS.items():
        if getattr(args, name) is not None:
            fraction(f"--{name}", getattr(args, name), top_inclusive=one_allowed)
    for name, (low, high, interval, why) in MAIN_FLOAT_FLAGS.items():
        number_in(f"--{name}", getattr(args, name), low, high, interval, why)
    for name in ("blr", "lr"):
        if getattr(args, name) is not None:
            _at_most(f"--{name}", finite_positive(f"--{name}", getattr(args, name)), 1, _LR_WHY)
    _at_most("--min_lr", finite_nonnegative("--min_lr", args.min_lr), 1, _LR_WHY)
    if args.r_weight is not None:
        finite_positive("--r_weight", args.r_weight)
    for name in ("weight_decay", "grad_clip"):
        finite_nonnegative(f"--{name}", getattr(args, name))
    args.num_iter_list = parse_num_iter_list(args.num_iter_list)
    check_sampling_args(args.temperature, args.cfg, args.filter_threshold)
    check_device(args.device)


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
