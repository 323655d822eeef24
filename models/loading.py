"""`load_model`: the right FractalGen for a checkpoint, in one call.

    model = models.load_model("pretrained_models/fractalmar_in64")   # or the file, or just the name
    images = model.generate([207, 360])                              # the checkpoint's sampling settings

It takes an official checkpoint (a file, its folder, or the model's name; `download=True`
fetches a missing one), a checkpoint main_fractalgen.py wrote, or the quick start's. The
file is read with `torch.load(weights_only=True)` (`load_checkpoint`), after every record
of its zip container is checked against the CRC-32 torch.save stored with it. The architecture is
the checkpoint's own configuration record (its 'config' entry, which main_fractalgen.py
writes), so no other file is needed; an official checkpoint has none, and then it comes
from `model=` (a name or a JSON file), else the checkpoint's 'args', else the folder name
(pretrained_models/<name>/), with class_num read from the class embedding. The weights
load strictly.

Weights: a checkpoint trained with --ema_rate also holds a moving average of the weights
('model_ema', under the keys of 'model'); it is loaded instead of the raw weights unless
`ema=False`, and `model.weights` says which ("ema" or "raw").

Sampling settings: those a checkpoint stores under 'sampling' (a sweep's, the quick
start's), then for a checkpoint main_fractalgen.py trained the training run's own flags and
neutral cfg 1 / temperature 1, then the record's own ('sampling', e.g. a named model's
DEFAULT_SAMPLING); models.sampling says the order and why. They become the defaults of
`model.generate`; `model.sampling_origins()` says where each came from.
"""
import argparse
import mmap as memory_map
import os
import pickle
import re
import zipfile
import zlib

import torch

from . import sampling as provenance
from .checks import SAMPLING_KEYS, check_sampling, parse_num_iter_list
from .config import (CONFIGS, SAMPLING, build, check_config, config_name, get_config, is_config_file,
                     read_config_file)
from .errors import UserInputError
from .fractalgen import CheckpointMismatchError
from .hub import HUB_PREFIX, fetch_files, folder_sources, is_hub_source, read_weights, split_folder_config
from .zoo import CHECKPOINT_NAME, PRETRAINED_URLS, download_pretrained

CONFIG = "config"  # the checkpoint key of the configuration record
EMA_KEY = "model_ema"  # the checkpoint key of the EMA weights (main_fractalgen.py --ema_rate)
SAMPLING_SOURCE = "sampling_source"  # who stored a checkpoint's 'sampling' settings, on what evidence
SAFE_GLOBALS = [argparse.Namespace]  # official checkpoints store their flags as a Namespace
# 'args' entries of an official checkpoint that shape the architecture besides the model
# name (dropout, learning rate and paths do not matter for sampling)
ARCH_ARGS = ("num_conds", "guiding_pixel")


# ---------------------------------------------------------------------- safe loading
# how files that are often passed by mistake begin (torch.save writes a zip, older torch a pickle)
FILE_SIGNATURES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
                   (b"\x93NUMPY", "a NumPy array"), (b"{", "a JSON or text file"), (b"#", "a text file"))


def not_a_torch_file(path):
    """What `path` is when it is plainly not a torch.save file ('a PNG image, not a file
    torch.save wrote'; 'empty'), else None (a zip or a pickle: torch.load decides)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return None
    kind = next((kind + ", " for signature, kind in FILE_SIGNATURES if head.startswith(signature)), "")
    return f"{kind}not a file torch.save wrote"


def safe_load(path, what, allowed=(), mmap=False):
    """torch.load(path, weights_only=True) on the CPU, allowing only tensors, plain
    containers and the classes in `allowed`. A missing, corrupt or unsafe file raises
    UserInputError with one sentence; `what` names the file in it (e.g. "checkpoint").
    mmap: map the file's tensors instead of reading them into memory (for a load that
    copies them into a model at once; files in the pre-1.6 format are read as before)."""
    if not os.path.isfile(path):
        raise UserInputError(f"{what} {path} does not exist")
    kind = not_a_torch_file(path)
    if kind:
        raise NotATorchFileError(f"cannot read {what} {path}: it is {kind}",
                                 f"pass the {what} file itself (.pth) or the folder that holds it")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            if mmap and zipfile.is_zipfile(path):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message goes on to suggest weights_only=False: never pass that advice on
        found = re.search(r"GLOBAL (\S+?)(?: whose | was |\s|$)", str(e))
        if found is None and not any(words in str(e) for words in _OBJECT_REFUSALS):
            # no class in sight: bytes that are no pickle torch.save wrote
            raise DamagedFileError(f"cannot read {what} {path}: it is damaged or not a PyTorch file "
                                   f"({_first_line(e)})") from None
        culprit = f" (it references {found.group(1)})" if found else ""
        kinds = ", ".join(["tensors", "plain containers", *(f"{c.__module__}.{c.__qualname__}" for c in allowed)])
        raise UserInputError(f"refusing to load {what} {path}: it holds objects other than {kinds}{culprit}, "
                             f"which could run code when unpickled; use a file that holds only those") from None
    except Exception as e:  # noqa: BLE001 -- weights_only loading runs no code: any failure means bad bytes
        raise DamagedFileError(f"cannot read {what} {path}: it is truncated, damaged or not a PyTorch file "
                               f"({_first_line(e)})") from None


# how torch's weights-only unpickler refuses an object it does not allow (besides a GLOBAL)
_OBJECT_REFUSALS = ("Can only create new object", "Can only build")


class NotATorchFileError(UserInputError):
    """A file that is plainly no torch.save file (empty, an image, text). `problem` says what
    it is without the advice, for a caller that has its own way out (a previous checkpoint)."""

    def __init__(self, problem, advice):
        super().__init__(f"{problem}; {advice}")
        self.problem = problem


class DamagedFileError(UserInputError):
    """A file whose bytes are not what was written: truncated, a checksum mismatch, garbage."""


def _first_line(exc):
    """The reason in an exception's message, short: torch's unpickler error says it after
    'WeightsUnpickler error:' (its first lines advise weights_only=False, never passed
    on); other messages say it in their first sentence."""
    text = str(exc).strip()
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    line = found.group(1) if found else (text.splitlines()[0] if text else "")
    line = line.split(". ")[0].rstrip(".")
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def verify_zip_records(path, what="checkpoint"):
    """Check every record of a torch.save zip file against the CRC-32 stored with it
    (torch.load itself does not), reading the file once through a memory map. Raises
    DamagedFileError naming the first record that differs. Files that are not zip
    archives (the legacy format has no checksums) and files written with torch's CRC
    computation switched off (every stored CRC 0) are not checked; torch.load reports
    those that are damaged."""
    try:
        with open(path, "rb") as f:
            try:
                archive = zipfile.ZipFile(f)
            except zipfile.BadZipFile:
                return
            with archive, memory_map.mmap(f.fileno(), 0, access=memory_map.ACCESS_READ) as data:
                records = archive.infolist()
                if all(info.CRC == 0 for info in records):
                    return
                for info in records:
                    if _record_crc(archive, data, info) != info.CRC:
                        raise DamagedFileError(f"{what} {path} is damaged: its record {info.filename} does not "
                                               f"match the CRC-32 checksum stored with it (a changed byte)")
    except DamagedFileError:
        raise
    except (OSError, ValueError) as e:  # ValueError: mmap of an empty file
        raise DamagedFileError(f"cannot read {what} {path}: it is truncated, damaged or not a PyTorch file "
                               f"({_first_line(e)})") from None


def _record_crc(archive, data, info):
    """CRC-32 of one record's bytes; a stored (uncompressed) record, as torch writes them,
    straight from the memory map, without copying."""
    if info.compress_type != zipfile.ZIP_STORED:
        crc = 0
        try:
            with archive.open(info) as f:  # checks the CRC itself at the end
                while chunk := f.read(1 << 24):
                    crc = zlib.crc32(chunk, crc)
        except (zipfile.BadZipFile, EOFError, NotImplementedError):
            return None
        return crc
    header = info.header_offset
    if data[header:header + 4] != b"PK\x03\x04":
        return None
    start = header + 30 + int.from_bytes(data[header + 26:header + 28], "little") + \
        int.from_bytes(data[header + 28:header + 30], "little")
    if start + info.compress_size > len(data):
        return None
    with memoryview(data) as view:
        return zlib.crc32(view[start:start + info.compress_size])


def load_checkpoint(path, mmap=False, verify=True):
    """Load a checkpoint dict on the CPU with weights_only=True (argparse.Namespace
    allowed; mmap: see safe_load), after checking its records against their CRC-32
    (`verify`). Raises UserInputError with one sentence for a missing, damaged or unsafe
    file (DamagedFileError for bytes that are not what was written)."""
    if not os.path.isfile(path):
        raise UserInputError(f"no checkpoint at {path}; pass --resume with the folder that holds "
                             f"{CHECKPOINT_NAME} (or the file itself)")
    if verify:
        verify_zip_records(path)
    ckpt = safe_load(path, "checkpoint", SAFE_GLOBALS, mmap=mmap)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserInputError(f"{path} is not a FractalGen checkpoint: expected a dict with a 'model' "
                             f"entry holding the state_dict")
    return ckpt


def checkpoint_class_num(ckpt):
    """Number of classes of the model in a checkpoint (rows of the class embedding), or None."""
    weight = ckpt["model"].get("class_emb.weight")
    return int(weight.shape[0]) if weight is not None else None


def checkpoint_args(ckpt):
    """The checkpoint's 'args' (an argparse.Namespace in official and our files) as a dict."""
    args = ckpt.get("args") or {}
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)


# ---------------------------------------------------------------------- finding the file
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


def resolve_checkpoint(path_or_name, download=False, root="pretrained_models", **download_kwargs):
    """File, folder or official model name -> path of an existing checkpoint file. A missing
    official checkpoint is downloaded when `download` (download_kwargs go to
    models.zoo.download_pretrained, e.g. progress_bar), else the error says how to get it.
    A Hub folder or id comes back as it is (load_model reads it)."""
    if is_hub_source(path_or_name):
        return os.fspath(path_or_name)
    path = os.fspath(path_or_name)
    file = os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path
    if os.path.isfile(file):
        return file
    if path in CONFIGS and os.path.isfile(os.path.join(root, path, CHECKPOINT_NAME)):  # a name: root/<name>/
        return os.path.join(root, path, CHECKPOINT_NAME)
    name, target = official_target(path, root)
    if name is None and os.path.isdir(path):
        inside = sorted(entry for entry in os.listdir(path)
                        if os.path.isfile(os.path.join(path, entry, CHECKPOINT_NAME))
                        or is_hub_source(os.path.join(path, entry)))
        hint = (f"did you mean {os.path.join(path, inside[0])}?" if inside else
                f"pass the folder that holds it, a checkpoint file or a Hub folder (config.json)")
        raise UserInputError(f"{path} is a folder without {CHECKPOINT_NAME}; {hint}")
    if name is None:
        raise UserInputError(f"checkpoint {path!r} not found; pass a checkpoint file, a folder holding "
                             f"{CHECKPOINT_NAME} or config.json, {HUB_PREFIX}USER/NAME, or an official model name "
                             f"({', '.join(PRETRAINED_URLS)})")
    if not download:
        raise UserInputError(f"{target} is not there yet; add --download (download=True in Python) or run "
                             f"`python util/download.py --model {name}`")
    return download_pretrained(name, os.path.dirname(os.path.dirname(target)), **download_kwargs)


# ---------------------------------------------------------------------- the configuration
def infer_model_name(path, args, model=None):
    """`model`, else the checkpoint's args.model, else the folder name."""
    name = model or args.get("model") or os.path.basename(os.path.dirname(os.path.abspath(path)))
    if name not in CONFIGS and not is_config_file(name):
        raise UserInputError(f"cannot tell the architecture of {path} (got {name!r}); pass --model "
                             f"(model= in Python) with one of {', '.join(CONFIGS)} or a JSON configuration file")
    return name


def checkpoint_config(ckpt, path, model=None):
    """(record, name) of the model a checkpoint holds.

    model (a name of CONFIGS or a JSON file) when given; else the checkpoint's own
    'config' record; else (official files) the name from its args or folder, with the
    architecture flags its args hold and class_num from the class embedding. A stored
    record is data from outside: checked like a JSON file. The record's 'sampling' is its
    own: the settings the checkpoint stores are read by checkpoint_sampling."""
    args = checkpoint_args(ckpt)
    given_by = args.get("model")
    if model is None and ckpt.get(CONFIG) is not None:
        record = check_config(ckpt[CONFIG], f"{path}: its '{CONFIG}' entry: ")
        name = config_name(given_by) if isinstance(given_by, str) and given_by else \
            os.path.basename(os.path.dirname(os.path.abspath(path)))
    else:
        name = infer_model_name(path, args, model)
        overrides = {k: args[k] for k in ARCH_ARGS if args.get(k) is not None}
        class_num = checkpoint_class_num(ckpt)
        if class_num is not None:
            overrides["class_num"] = class_num
        record = get_config(name, **overrides)
        name = config_name(name)
    return record, name


# ---------------------------------------------------------------------- sampling settings
def trained_here(ckpt):
    """Whether main_fractalgen.py trained the checkpoint (official files have neither key)."""
    return ckpt.get("train_state") is not None or ckpt.get(CONFIG) is not None


def stored_sampling(ckpt, path, levels):
    """(settings, source) the checkpoint stores ('sampling', 'sampling_source'), checked like
    a JSON file, or (None, None). A sweep's source measured at another training position
    than the checkpoint's (training went on after the sweep) is marked 'earlier_weights'."""
    stored = ckpt.get(SAMPLING)
    if stored is None:
        return None, None
    settings = check_sampling(stored, f"{path}: its '{SAMPLING}' entry: ", levels)
    source = ckpt.get(SAMPLING_SOURCE)
    source = dict(source) if isinstance(source, dict) else {"by": provenance.BY_CHECKPOINT}
    if source.get("by") == provenance.BY_SWEEP and "epoch" in source:
        measured = (source.get("epoch"), source.get("step", 0))
        source["earlier_weights"] = measured != provenance.position(ckpt)
    return settings, source


def run_flags(args, path, levels):
    """The sampling flags a training run set (its args; None: not set), checked."""
    flags = {k: args.get(k) for k in SAMPLING_KEYS if args.get(k) is not None}
    if isinstance(flags.get("num_iter_list"), str):
        flags["num_iter_list"] = parse_num_iter_list(flags["num_iter_list"])
    return check_sampling(flags, f"{path}: its args: ", levels)


def checkpoint_sampling(ckpt, path, record, name, model=None):
    """(settings, sources): the sampling defaults of the model a checkpoint holds and where
    each came from (models.sampling): stored, else (trained by main_fractalgen.py) the
    training run's flags, the user's JSON configuration's and neutral ones, else the
    record's. `model`: the --model (model=) given for it, if any."""
    levels = len(record["img_size_list"]) - 1
    stored, source = stored_sampling(ckpt, path, levels)
    args = checkpoint_args(ckpt)
    trained = trained_here(ckpt)
    user_record = is_config_file(model if model is not None else args.get("model"))
    pairs = provenance.layers(record.get(SAMPLING), name, stored, source, trained,
                              run_flags(args, path, levels) if trained else None, user_record)
    return provenance.resolve(pairs)


def load_model(path_or_name, model=None, device="cpu", download=False, root="pretrained_models", ema=True):
    """Build the model a checkpoint holds and load its weights strictly.

    path_or_name: a checkpoint file, a folder holding checkpoint-last.pth, an official
    model name (looked up in `root`; fetched there when `download`), a Hub folder
    (config.json + model.safetensors, see models.hub) or a Hub id `hf-hub:USER/NAME`
    (`hf-hub:USER/NAME@REVISION`), downloaded through huggingface_hub. model: a name of
    models.CONFIGS or a JSON configuration file, for a checkpoint that does not say (or to
    override what it says). ema: load the checkpoint's EMA weights ('model_ema') when it
    has them; False: the raw weights ('model'). Returns the FractalGen in eval mode on
    `device`, with `model_name`, `config`, `weights` ("ema" or "raw") and
    `sampling_defaults` / `sampling_sources` (checkpoint_sampling), `checkpoint_path` and
    `checkpoint_position` ((epoch, step): models.sampling.position) set. Bad input raises
    UserInputError
    (models.zoo.DownloadError for a failed download) with one sentence."""
    if is_hub_source(path_or_name):
        if model is not None:
            raise UserInputError(f"{os.fspath(path_or_name)} is a Hub folder: its config.json says what model it is; "
                                 f"leave out --model (model=)")
        return load_pretrained(path_or_name, device=device, ema=ema)
    path = resolve_checkpoint(path_or_name, download=download, root=root)
    ckpt = load_checkpoint(path, mmap=True)  # the weights are copied into the model: no second copy in memory
    record, name = checkpoint_config(ckpt, path, model)
    use_ema = ema and ckpt.get(EMA_KEY) is not None
    saved_by = checkpoint_args(ckpt).get("model")
    try:
        net = build(record, name)
        net.load_state_dict(ckpt[EMA_KEY if use_ema else "model"], strict=True)
    except CheckpointMismatchError as e:
        if model is not None and isinstance(saved_by, str) and config_name(saved_by) != config_name(model):
            raise UserInputError(f"{path} was saved by --model {saved_by}, not {config_name(model)}; drop --model "
                                 f"(model= in Python): the checkpoint names its architecture") from None
        raise UserInputError(f"{path} does not fit model {name}: {e}") from None
    except ValueError as e:  # arguments the factory rejects
        raise UserInputError(f"{path} does not fit model {name}: {e}") from None
    net.weights = "ema" if use_ema else "raw"
    net.sampling_defaults, net.sampling_sources = checkpoint_sampling(ckpt, path, record, name, model)
    net.checkpoint_path, net.checkpoint_position = path, provenance.position(ckpt)
    return net.to(device).eval()


def sampling_defaults(record):
    """The record's sampling settings as generate() takes them."""
    sampling = dict(record.get(SAMPLING) or {})
    if "num_iter_list" in sampling:
        sampling["num_iter_list"] = tuple(sampling["num_iter_list"])
    return sampling


def load_pretrained(source, device="cpu", revision=None, ema=True, **hub_kwargs):
    """A Hub folder -> the FractalGen it holds (eval mode, on `device`): a local folder, or a
    Hub repository ('hf-hub:USER/NAME[@REVISION]' or 'USER/NAME') fetched through
    huggingface_hub (hub_kwargs: cache_dir, force_download, local_files_only, token). The
    model is built from config.json and takes model.safetensors strictly: a folder whose
    configuration does not build the weights it holds is refused with one sentence.
    `model.weights` says whether they are EMA or raw weights; ema=False refuses a folder
    of EMA weights (it holds no others)."""
    config_path, weights_path, where = fetch_files(source, revision=revision, **hub_kwargs)
    config = read_config_file(config_path)
    record, name, weights = split_folder_config(config, where)
    if not ema and weights == "ema":
        raise UserInputError(f"{where} holds only EMA weights (its config.json says so); leave out --no_ema "
                             f"(ema=False), or export the checkpoint again with --no_ema for its raw weights")
    record = check_config(record, f"{where}: its config.json: ")
    net = build(record, name)
    try:
        net.load_state_dict(read_weights(weights_path, where), strict=True)
    except CheckpointMismatchError as e:
        raise UserInputError(f"{where}: its config.json does not build the weights in model.safetensors "
                             f"({str(e).split(': ', 1)[-1]}); the folder is inconsistent: export it again") from None
    net.sampling_defaults = sampling_defaults(record)
    net.sampling_sources = folder_sources(config, net.sampling_defaults)
    net.weights = weights
    return net.to(device).eval()
