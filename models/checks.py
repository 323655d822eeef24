"""Checks of user-given values: numbers, sampling settings and model configurations.

Each check raises `UserInputError` (a ValueError) whose message names the value (`flag`,
or `where` + the field of a configuration record), what is wrong and what to give
instead. util.validation re-exports the number and sampling checks for the command-line
flags, so a bad value gets the same sentence from a flag, a JSON configuration file and a
checkpoint.
"""
import math
import numbers

from .errors import UserInputError

SAMPLING_KEYS = ("num_iter_list", "cfg", "cfg_schedule", "temperature", "filter_threshold")
CFG_SCHEDULES = ("linear", "constant")
GENERATOR_TYPES = ("ar", "mar")
NUM_LEVEL0_CONDS = 5  # level 0 hands five references to the class embedding to its generator
# what a configuration's lists hold, one entry per level (the last one: the pixel head)
LEVEL_LISTS = ("img_size_list", "embed_dim_list", "num_blocks_list", "num_heads_list", "generator_type_list")


# ---------------------------------------------------------------------- numbers
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


def number_in(flag, value, low, high, interval="[]", why=""):
    """A finite float in the interval from low to high, whose ends `interval` gives as in
    mathematics: "[)" includes low and excludes high."""
    x = _number(flag, value)
    above = x >= low if interval[0] == "[" else x > low
    below = x <= high if interval[1] == "]" else x < high
    if not (math.isfinite(x) and above and below):
        raise UserInputError(f"{flag} must be a number in {interval[0]}{low:g}, {high:g}{interval[1]}{why}, "
                             f"got {value}")
    return x


def positive_int(flag, value, minimum=1, maximum=None, why=""):
    """A whole number >= minimum (and <= maximum; `why` says why, e.g. " (a C int)") -- an
    int, or a float or string holding one; not a bool."""
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
    if maximum is not None and value > maximum:
        raise UserInputError(f"{flag} must be at most {maximum}{why}, got {value}")
    return value


# ---------------------------------------------------------------------- sampling settings
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


def check_sampling(settings, where="", levels=None):
    """A dict of sampling settings (a subset of SAMPLING_KEYS; None values mean 'not set')
    from a configuration or a checkpoint -> a checked copy without the None values;
    num_iter_list becomes a tuple with one entry per generator level when `levels` is given.
    `where` prefixes the messages (e.g. "my.json: sampling ")."""
    if not isinstance(settings, dict):
        raise UserInputError(f"{where.rstrip()} must be a dict of {', '.join(SAMPLING_KEYS)}, got {settings!r}")
    unknown = sorted(set(settings) - set(SAMPLING_KEYS))
    if unknown:
        raise UserInputError(f"{where}key(s) {', '.join(map(repr, unknown))} unknown; the sampling settings are "
                             f"{', '.join(SAMPLING_KEYS)}")
    out = {k: v for k, v in settings.items() if v is not None}
    for key in ("temperature", "cfg", "filter_threshold"):
        if key in out and (isinstance(out[key], bool) or not isinstance(out[key], numbers.Real)):
            raise UserInputError(f"{where}{key} must be a number, got {out[key]!r}")
    check_sampling_args(out.get("temperature"), out.get("cfg"), out.get("filter_threshold"), prefix=where)
    if "cfg_schedule" in out and out["cfg_schedule"] not in CFG_SCHEDULES:
        raise UserInputError(f"{where}cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}, "
                             f"got {out['cfg_schedule']!r}")
    if "num_iter_list" in out:
        iters = out["num_iter_list"]
        if not isinstance(iters, (list, tuple)):
            raise UserInputError(f"{where}num_iter_list must be a list of positive integers, e.g. [64, 16], "
                                 f"got {iters!r}")
        out["num_iter_list"] = parse_num_iter_list(tuple(iters), flag=f"{where}num_iter_list")
        if levels is not None and len(iters) != levels:
            raise UserInputError(f"{where}num_iter_list {list(iters)} has {len(iters)} entries but the model has "
                                 f"{levels} generator level(s); give one per level")
    return out


# ---------------------------------------------------------------------- configurations
def whole(field, value, minimum=1):
    """A configuration's integer field: an int (not a bool, not a string) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserInputError(f"{field} must be a whole number, got {value!r}")
    if value < minimum:
        raise UserInputError(f"{field} must be at least {minimum}, got {value}")
    return int(value)


def fraction(field, value, top_inclusive=True):
    """A probability: a number in [0, 1] (or [0, 1) when not top_inclusive)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not (0 <= value <= 1 if top_inclusive else 0 <= value < 1):
        raise UserInputError(f"{field} must be a number in [0, 1{']' if top_inclusive else ')'}, got {value!r}")
    return float(value)


def flag_value(field, value):
    if not isinstance(value, bool):
        raise UserInputError(f"{field} must be true or false, got {value!r}")
    return value


def level_list(field, values, check, example="one entry per level, e.g. [64, 4, 1]"):
    """A list (or tuple) whose entries pass check(f'{field}[i]', entry)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise UserInputError(f"{field} must be a list with {example}, got {values!r}")
    return [check(f"{field}[{i}]", v) for i, v in enumerate(values)]


def generator_type(field, value):
    if value not in GENERATOR_TYPES:
        raise UserInputError(f"{field} {value!r} is not a generator type; use one of {', '.join(GENERATOR_TYPES)}")
    return value


def check_architecture(config, where=""):
    """Reject a configuration the architecture cannot run, before anything is built.
    config: FractalGen's keywords (every one present); `where` prefixes the messages."""
    c = config
    lists = {name: level_list(where + name, c[name], generator_type if name == "generator_type_list" else whole)
             for name in LEVEL_LISTS}
    sizes, dims, blocks, heads, kinds = (lists[name] for name in LEVEL_LISTS)
    n = len(sizes)
    if n < 2:
        raise UserInputError(f"{where}img_size_list {sizes} needs at least two levels, e.g. [64, 4, 1]")
    for name in LEVEL_LISTS[1:]:
        if len(lists[name]) != n:
            raise UserInputError(f"{where}{name} has {len(lists[name])} entries but img_size_list has {n}; "
                                 f"give one per level")
    if sizes[-1] != 1:
        raise UserInputError(f"{where}img_size_list {sizes}: the last entry must be 1 (the pixel level), "
                             f"got {sizes[-1]}")
    for L, (size, sub) in enumerate(zip(sizes, sizes[1:])):
        if size % sub:
            raise UserInputError(f"{where}img_size_list {sizes}: img_size_list[{L + 1}]={sub} does not divide "
                                 f"img_size_list[{L}]={size}; each level splits its image into patches of the "
                                 f"next size, so each entry must divide the one before (e.g. 28, 4, 1)")
    num_conds = whole(f"{where}num_conds", c["num_conds"])
    if num_conds > NUM_LEVEL0_CONDS:
        raise UserInputError(f"{where}num_conds must be between 1 and {NUM_LEVEL0_CONDS}, got {num_conds}")
    guiding_pixel = flag_value(f"{where}guiding_pixel", c["guiding_pixel"])
    for L in range(n):
        if dims[L] % heads[L]:
            what = "the pixel head" if L == n - 1 else f"level {L}"
            raise UserInputError(f"{where}num_heads_list[{L}]={heads[L]} does not divide embed_dim_list[{L}]="
                                 f"{dims[L]} ({what}); pick a head count that divides the width")
    for L, kind in enumerate(kinds[:-1]):
        if kind == "ar" and (dims[L] // heads[L]) % 4:
            raise UserInputError(f"{where}AR level {L} needs a head size divisible by 4 for its 2-D rotary "
                                 f"embedding; embed_dim_list[{L}]/num_heads_list[{L}] = {dims[L]}/{heads[L]} is not")
        if kind == "ar" and guiding_pixel and L > 0:
            raise UserInputError(f"{where}guiding_pixel is only supported by MAR levels; generator_type_list[{L}] "
                                 f"is 'ar' (set guiding_pixel false or make level {L} MAR)")
        if L > 0 and kind == "mar" and kinds[L - 1] == "ar" and num_conds > 1:
            raise UserInputError(f"{where}a MAR level with num_conds={num_conds} cannot sit below an AR level "
                                 f"(level {L - 1} hands down one condition); use num_conds 1 or make level "
                                 f"{L - 1} MAR")
    whole(f"{where}class_num", c["class_num"])
    fraction(f"{where}label_drop_prob", c["label_drop_prob"])
    fraction(f"{where}attn_dropout", c["attn_dropout"], top_inclusive=False)
    fraction(f"{where}proj_dropout", c["proj_dropout"], top_inclusive=False)
    if isinstance(c["r_weight"], bool) or not isinstance(c["r_weight"], numbers.Real):
        raise UserInputError(f"{where}r_weight must be a number, got {c['r_weight']!r}")
    finite_positive(f"{where}r_weight", c["r_weight"])
    flag_value(f"{where}grad_checkpointing", c["grad_checkpointing"])
    channels = whole(f"{where}in_channels", c["in_channels"])
    for name in ("pixel_mean", "pixel_std"):
        if c[name] is None:
            continue
        values = level_list(f"{where}{name}", c[name], real, "one number per channel, e.g. [0.5]")
        if len(values) != channels:
            raise UserInputError(f"{where}{name} has {len(values)} entries but in_channels is {channels}; give one "
                                 f"per channel (or leave it out for the default)")
        if name == "pixel_std" and min(values) <= 0:
            raise UserInputError(f"{where}pixel_std must be above 0 for every channel, got {values}")


def real(field, value):
    """A finite number (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UserInputError(f"{field} must be a finite number, got {value!r}")
    return float(value)
