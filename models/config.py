"""Configuration records: a model's whole shape as one plain dict.

A record holds FractalGen's constructor keywords (`img_size_list`, `embed_dim_list`,
`num_blocks_list`, `num_heads_list`, `generator_type_list`, `num_conds`, `guiding_pixel`,
`class_num`, ...) and, optionally, `sampling`: the default sampling settings of the model
(`num_iter_list`, `cfg`, `cfg_schedule`, `temperature`, `filter_threshold`). Keywords a
record leaves out take FractalGen's defaults.

The named models are the rows of one table, `CONFIGS`; a JSON file holding such a record
is one more:

    model = create_model("fractalmar_in64")          # a row of the table
    model = create_model("configs/digits28.json")    # a record of your own
    model = create_model({"img_size_list": [32, 8, 1], ...}, class_num=10)
    model.config                                     # the record back, complete

Every record is checked before anything is built; a bad one raises UserInputError with
one sentence naming the field and the fix. Checkpoints store `model.config` under
'config', so `models.load_model` rebuilds the model from the checkpoint alone.
"""
import difflib
import inspect
import json
import os

from .checks import LEVEL_LISTS, check_architecture, check_sampling
from .errors import UserInputError
from .fractalgen import FractalGen

SAMPLING = "sampling"  # the record key of the default sampling settings
# every keyword of the constructor except the internal recursion depth
CONFIG_KEYS = tuple(name for name in inspect.signature(FractalGen.__init__).parameters
                    if name not in ("self", "fractal_level"))
RECORD_KEYS = CONFIG_KEYS + (SAMPLING,)

_IN64 = dict(img_size_list=[64, 4, 1], embed_dim_list=[1024, 512, 128], num_blocks_list=[32, 8, 3],
             num_heads_list=[16, 8, 4])
_IN256 = dict(img_size_list=[256, 16, 4, 1], generator_type_list=["mar", "mar", "mar", "ar"], num_conds=5,
              guiding_pixel=True)
_TINY = dict(img_size_list=[16, 4, 1], embed_dim_list=[64, 32, 16], num_blocks_list=[2, 1, 1],
             num_heads_list=[4, 2, 2])


def _sampling(num_iter_list, cfg, temperature):
    return dict(num_iter_list=num_iter_list, cfg=cfg, cfg_schedule="linear", temperature=temperature,
                filter_threshold=1e-4)


# The named models. Sampling: the settings of the official evaluation commands (FID-50K in
# the official README); the tiny models have no official numbers: theirs are what the quick
# start's briefly trained models sample best with (a small model spreads some probability
# over wrong colours; sharper logits and mild guidance remove it).
CONFIGS = {
    "fractalar_in64": dict(**_IN64, generator_type_list=["ar", "ar", "ar"], num_conds=1, guiding_pixel=False,
                           sampling=_sampling([64, 16], 11.0, 1.03)),
    "fractalmar_in64": dict(**_IN64, generator_type_list=["mar", "mar", "ar"], num_conds=5, guiding_pixel=False,
                            sampling=_sampling([64, 16], 6.5, 1.02)),
    "fractalmar_base_in256": dict(**_IN256, embed_dim_list=[768, 384, 192, 64], num_blocks_list=[24, 6, 3, 1],
                                  num_heads_list=[12, 6, 3, 4], sampling=_sampling([64, 16, 16], 29.0, 1.1)),
    "fractalmar_large_in256": dict(**_IN256, embed_dim_list=[1024, 512, 256, 64], num_blocks_list=[32, 8, 4, 1],
                                   num_heads_list=[16, 8, 4, 4], sampling=_sampling([64, 16, 16], 21.0, 1.1)),
    "fractalmar_huge_in256": dict(**_IN256, embed_dim_list=[1280, 640, 320, 64], num_blocks_list=[40, 10, 5, 1],
                                  num_heads_list=[16, 8, 4, 4], sampling=_sampling([64, 16, 16], 19.0, 1.1)),
    # ~0.2M and ~0.15M parameters, 16x16 images: CPU experiments and tests
    "fractalar_tiny": dict(**_TINY, generator_type_list=["ar", "ar", "ar"], num_conds=1,
                           sampling=_sampling([16, 16], 2.0, 2.0)),
    "fractalmar_tiny": dict(**_TINY, generator_type_list=["mar", "mar", "ar"], num_conds=5,
                            sampling=_sampling([16, 16], 2.0, 2.0)),
}
# the sampling settings of each named model (official API)
DEFAULT_SAMPLING = {name: dict(record[SAMPLING], num_iter_list=tuple(record[SAMPLING]["num_iter_list"]))
                    for name, record in CONFIGS.items()}


def is_config_file(value):
    """Whether a --model value names a JSON file rather than a table entry."""
    return isinstance(value, (str, os.PathLike)) and os.fspath(value).lower().endswith(".json")


def config_name(value):
    """A short name for messages and `model.model_name`: the table name, or a JSON file's stem."""
    if isinstance(value, dict):
        return "custom"
    value = os.fspath(value)
    return os.path.splitext(os.path.basename(value))[0] if is_config_file(value) else value


def read_config_file(path):
    """The record in a JSON file (not yet checked); one sentence when it cannot be read."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserInputError(f"configuration file {path} does not exist; pass a JSON file of FractalGen keywords "
                             f"or a model name ({', '.join(CONFIGS)})")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except json.JSONDecodeError as e:
        raise UserInputError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                             f"fix the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"cannot read configuration file {path} ({e}); pass a readable JSON file") from None
    if not isinstance(record, dict):
        raise UserInputError(f"{path} must hold a JSON object of FractalGen keywords, e.g. "
                             f'{{"img_size_list": [32, 8, 1], ...}}, not a {type(record).__name__}')
    return record


def check_config(record, where=""):
    """A record (possibly partial: left-out keywords take FractalGen's defaults) -> a
    checked copy with lists for the per-level entries. `where` prefixes the messages
    (e.g. "my.json: "). Raises UserInputError naming the field and the fix."""
    if not isinstance(record, dict):
        raise UserInputError(f"{where}a configuration must be a dict of FractalGen keywords, got "
                             f"{type(record).__name__}")
    unknown = [key for key in record if key not in RECORD_KEYS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), RECORD_KEYS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserInputError(f"{where}unknown key {key!r}; {hint}the keys are {', '.join(RECORD_KEYS)}")
    missing = [key for key in LEVEL_LISTS if key not in record]
    if missing:
        raise UserInputError(f"{where}{missing[0]} is missing; a configuration needs {', '.join(LEVEL_LISTS)} "
                             f"(one entry per level)")
    keywords = {k: v for k, v in record.items() if k != SAMPLING}
    signature = inspect.signature(FractalGen.__init__).parameters
    complete = {k: keywords.get(k, signature[k].default) for k in CONFIG_KEYS}
    check_architecture(complete, where)
    out = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in keywords.items()}
    if record.get(SAMPLING) is not None:
        levels = len(complete["img_size_list"]) - 1
        sampling = check_sampling(record[SAMPLING], f"{where}{SAMPLING} ", levels=levels)
        out[SAMPLING] = {k: list(v) if isinstance(v, tuple) else v for k, v in sampling.items()}
    return out


def get_config(model, **overrides):
    """A checked record: `model` is a name of CONFIGS, a path to a JSON file, or a record
    (dict); `overrides` (constructor keywords, or `sampling`) replace its entries."""
    if isinstance(model, dict):
        record, where = dict(model), ""
    elif is_config_file(model):
        record, where = read_config_file(model), f"{os.fspath(model)}: "
    elif model in CONFIGS:
        record, where = dict(CONFIGS[model]), ""
    else:
        raise UserInputError(f"unknown model {model!r}; choose one of: {', '.join(CONFIGS)}, or pass a JSON "
                             f"file of FractalGen keywords (FILE.json)")
    record.update(overrides)
    return check_config(record, where)


def build(record, name=None):
    """A FractalGen from a checked record; sets model_name and the record's sampling."""
    keywords = {k: v for k, v in record.items() if k != SAMPLING}
    model = FractalGen(**keywords)
    model.model_name = name
    model.record_sampling = dict(record[SAMPLING]) if record.get(SAMPLING) else None
    return model


def create_model(model, **kwargs):
    """Build a model from a name of CONFIGS, a JSON file or a record (dict); keyword
    arguments override the record's entries. An untrained model keeps the official
    API's sampling defaults in generate() (cfg 1, temperature 1); `model.config` holds
    the record, its sampling settings included. A bad name or record raises
    UserInputError (a ValueError) with one sentence."""
    return build(get_config(model, **kwargs), config_name(model))


def _factory(name):
    def factory(**kwargs):
        return create_model(name, **kwargs)
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"The {name} configuration (models.CONFIGS[{name!r}]); keywords override its entries."
    return factory


# the official factory functions and the name -> factory registry
MODELS = {name: _factory(name) for name in CONFIGS}
fractalar_in64 = MODELS["fractalar_in64"]
fractalmar_in64 = MODELS["fractalmar_in64"]
fractalmar_base_in256 = MODELS["fractalmar_base_in256"]
fractalmar_large_in256 = MODELS["fractalmar_large_in256"]
fractalmar_huge_in256 = MODELS["fractalmar_huge_in256"]
fractalar_tiny = MODELS["fractalar_tiny"]
fractalmar_tiny = MODELS["fractalmar_tiny"]
