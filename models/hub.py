"""Hub folders: a FractalGen as models are shared on the Hugging Face Hub -- `config.json`
(its configuration record), `model.safetensors` (its weights) and `README.md` (a model
card) -- written, fetched and uploaded through huggingface_hub. FractalGen takes
save_pretrained / from_pretrained / push_to_hub from its PyTorchModelHubMixin:

    model.save_pretrained("my-model")                     # the folder
    model.push_to_hub("user/my-model")                     # the same folder, on the Hub
    model = FractalGen.from_pretrained("my-model")         # a folder, or a Hub id ("user/my-model")
    model = models.load_model("hf-hub:user/my-model")      # load_model and --ckpt take both as well

config.json is `model.config`, the record checkpoints store under 'config' (every
constructor keyword, class_num among them), with 'sampling' set to the settings
generate() uses, plus entries of the folder itself: 'model_name', 'weights' ("ema" or
"raw": which weights model.safetensors holds) and 'sampling_sources' (where each sampling
setting came from: models.sampling). models.loading builds the model from it
and loads the weights strictly.

Downloads go through huggingface_hub's hf_hub_download (its cache, HF_ENDPOINT, HF_TOKEN,
HF_HUB_OFFLINE). Before that, one TCP connection to the endpoint (or the proxy) tells
whether the Hub can be reached at all: when it cannot, the files come from the cache or
the load stops at once with one line (hf_hub_download alone retries for about 25 s).
This module imports no other module of the package but errors and sampling (models.fractalgen imports it).
"""
import os
import socket
import urllib.parse
import urllib.request

from . import sampling as provenance
from .errors import UserInputError

HUB_PREFIX = "hf-hub:"             # models.load_model("hf-hub:user/name"), or "hf-hub:user/name@revision"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SAMPLING = "sampling"
SAMPLING_SOURCES = "sampling_sources"  # where each sampling setting came from (models.sampling)
FOLDER_KEYS = ("model_name", "weights", SAMPLING_SOURCES)  # config.json entries beside the configuration record
WEIGHTS = {"ema": "the exponential moving average (EMA) of the trained weights", "raw": "the trained weights"}
PROBE_TIMEOUT_S = 3.0
PAPER_URL = "https://arxiv.org/abs/2502.17437"

# huggingface_hub fills this Jinja template (ModelCard.from_template) into README.md
MODEL_CARD = """---
{{ card_data }}
---

# {{ title }}

A FractalGen model ([Fractal Generative Models](""" + PAPER_URL + """), Li, Sun, Fan, He, 2025):
{{ summary }}.

- `model.safetensors`: {{ weights_text }}.
- `config.json`: the configuration record (the keyword arguments of `FractalGen`), the
  sampling settings it samples with unless told otherwise ({{ sampling_text }}), and which
  weights the file holds.

Load it with the FractalGen code (from the root of its repository):

```python
from models import load_model

model = load_model("hf-hub:USER/NAME")     # this repository's id, or the path of a local copy
images = model.generate([0])               # uint8 (1, 3, {{ size }}, {{ size }}); class labels 0..{{ last_class }}
```

or `python demo/sample.py --ckpt hf-hub:USER/NAME --labels 0`, or the web demo:
`python demo/app.py --ckpt hf-hub:USER/NAME`.
"""
# metadata of the card, handed to PyTorchModelHubMixin when FractalGen subclasses it
CARD_INFO = dict(library_name="fractalgen", paper_url=PAPER_URL, model_card_template=MODEL_CARD,
                 tags=["fractalgen", "image-generation", "class-conditional", "pixel-space"])


# ---------------------------------------------------------------------- writing
def folder_config(model):
    """config.json of `model`: its configuration record with the sampling settings
    generate() uses, its name, and which weights it holds."""
    config = dict(model.config)
    config[SAMPLING] = {k: list(v) if isinstance(v, tuple) else v for k, v in model.sampling_config().items()}
    config["model_name"] = model.model_name
    config["weights"] = getattr(model, "weights", None) or "raw"
    config[SAMPLING_SOURCES] = model.sampling_origins()
    return config


def card_kwargs(model):
    """What the model card says about `model` (the values MODEL_CARD refers to)."""
    record, settings = model.config, model.sampling_config()
    levels = " -> ".join(str(s) for s in record["img_size_list"])
    generators = ", ".join(t.upper() for t in record["generator_type_list"][:-1])
    params = sum(p.numel() for p in model.parameters())
    weights = getattr(model, "weights", None) or "raw"
    return dict(
        title=model.model_name or "FractalGen",
        summary=(f"{model.img_size}x{model.img_size} images, {model.class_num} classes, generators {generators} "
                 f"over the levels {levels}, {params / 1e6:.2f}M parameters"),
        weights_text=WEIGHTS.get(weights, weights),
        sampling_text=", ".join(f"{k} {list(v) if isinstance(v, tuple) else v}" for k, v in settings.items()),
        size=model.img_size, last_class=model.class_num - 1)


# ---------------------------------------------------------------------- finding the files
def is_hub_source(path_or_name):
    """Whether load_model should read `path_or_name` as a Hub folder: `hf-hub:ID`, or a folder
    holding config.json (and no training checkpoint)."""
    if not isinstance(path_or_name, (str, os.PathLike)):
        return False
    text = os.fspath(path_or_name)
    if text.startswith(HUB_PREFIX):
        return True
    return os.path.isfile(os.path.join(text, CONFIG_FILE)) and not os.path.isfile(
        os.path.join(text, "checkpoint-last.pth"))


def split_hub_id(source, revision=None):
    """'hf-hub:user/name@rev' (or 'user/name') -> ('user/name', revision)."""
    repo_id = source[len(HUB_PREFIX):] if source.startswith(HUB_PREFIX) else source
    if "@" in repo_id:
        repo_id, at = repo_id.split("@", 1)
        revision = revision or at
    return repo_id, revision


def hub_endpoint():
    """The Hub's address: HF_ENDPOINT (read now, so a changed environment counts), else
    huggingface_hub's default."""
    from huggingface_hub import constants
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_offline():
    from huggingface_hub import constants
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def unreachable(url, timeout=PROBE_TIMEOUT_S):
    """None when a TCP connection to the host of `url` (or to the proxy for it) opens within
    `timeout` seconds, else why not ("Connection refused", "Name or service not known", ...)."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as e:
        return getattr(e, "strerror", None) or str(e) or type(e).__name__
    return None


def fetch_files(source, revision=None, cache_dir=None, force_download=False, local_files_only=False, token=None):
    """(config.json path, model.safetensors path, what to call the source in messages) of a
    local folder or a Hub repository ('hf-hub:user/name[@revision]' or 'user/name'), the
    latter downloaded into huggingface_hub's cache. Every failure is one UserInputError."""
    source = os.fspath(source)
    if os.path.isdir(source):
        files = [os.path.join(source, name) for name in (CONFIG_FILE, WEIGHTS_FILE)]
        for path in files:
            if not os.path.isfile(path):
                raise UserInputError(f"{source} has no {os.path.basename(path)}: a Hub folder holds {CONFIG_FILE} and "
                                     f"{WEIGHTS_FILE} (`python -m util.export CKPT FOLDER` writes one)")
        return files[0], files[1], source
    looks_like_id = source.startswith(HUB_PREFIX) or (source.count("/") == 1 and not source.startswith((".", "/", "~")))
    if not looks_like_id:
        raise UserInputError(f"{source} is not a folder; pass a Hub folder (holding {CONFIG_FILE}) or a Hub id "
                             f"such as hf-hub:USER/NAME")
    from huggingface_hub import hf_hub_download
    repo_id, revision = split_hub_id(source, revision)
    endpoint, offline = hub_endpoint(), hub_offline()
    reason = None if (offline or local_files_only) else unreachable(endpoint)
    paths = []
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            paths.append(hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir, endpoint=endpoint,
                                         force_download=force_download, token=token,
                                         local_files_only=bool(local_files_only or offline or reason)))
        except Exception as e:  # huggingface_hub's errors (and the HTTP client's): one sentence each
            raise UserInputError(download_error(e, repo_id, revision, name, endpoint, reason, offline)) from None
    return paths[0], paths[1], f"{HUB_PREFIX}{repo_id}"


def download_error(error, repo_id, revision, name, endpoint, reason, offline):
    """The sentence for a failed hf_hub_download of `name` from `repo_id`."""
    from huggingface_hub import errors
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if isinstance(error, errors.HFValidationError):
        return f"{repo_id!r} is not a Hub repository id; use hf-hub:USER/NAME, or the path of a folder holding {CONFIG_FILE}"
    if isinstance(error, errors.GatedRepoError):
        return f"Hub repository {repo_id} is gated: accept its conditions on the Hub, then log in (`hf auth login`)"
    if isinstance(error, errors.RepositoryNotFoundError):
        return (f"Hub repository {repo_id} was not found at {endpoint}; check the id (a private repository also "
                f"needs `hf auth login` or HF_TOKEN)")
    if isinstance(error, errors.RevisionNotFoundError):
        return f"Hub repository {repo_id} has no revision {revision!r}; leave it out for the latest, or check it"
    if isinstance(error, errors.RemoteEntryNotFoundError):
        return (f"Hub repository {repo_id} has no {name}: it is not a FractalGen Hub folder (one holds {CONFIG_FILE} "
                f"and {WEIGHTS_FILE}; `python -m util.export` writes one)")
    if isinstance(error, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        if reason:
            return (f"cannot reach the Hub at {endpoint} ({reason}) and {repo_id} is not in the local cache; connect "
                    f"this machine to the network, or copy the folder here and pass its path")
        if offline:
            return (f"HF_HUB_OFFLINE is set and {repo_id} ({name}) is not in the local cache; unset it to download, "
                    f"or pass the path of a local copy")
        return f"cannot download {name} of {repo_id} from {endpoint}: {first}"
    if isinstance(error, errors.HfHubHTTPError) and error.response is not None:
        return f"the Hub at {endpoint} answered {error.response.status_code} for {name} of {repo_id}: {first}"
    return f"cannot download {name} of {repo_id} from {endpoint}: {first}"


# ---------------------------------------------------------------------- reading the files
def split_folder_config(config, where):
    """The parsed config.json of a folder -> (configuration record, not yet checked; model
    name; weights kind)."""
    record = {k: v for k, v in config.items() if k not in FOLDER_KEYS}
    name, weights = config.get("model_name"), config.get("weights", "raw")
    if name is not None and not isinstance(name, str):
        raise UserInputError(f"{where}: {CONFIG_FILE}'s model_name must be a string, got {name!r}")
    if weights not in WEIGHTS:
        raise UserInputError(f"{where}: {CONFIG_FILE}'s weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    return record, name, weights


def folder_sources(config, settings):
    """Where each of `settings` (a folder's sampling settings) came from: its config.json's
    'sampling_sources' where it names one ({"by": ...}), else {"by": "Hub folder"} (provenance.BY_FOLDER)."""
    stored = config.get(SAMPLING_SOURCES)
    stored = stored if isinstance(stored, dict) else {}
    return {key: dict(stored[key]) if isinstance(stored.get(key), dict) and isinstance(stored[key].get("by"), str)
            else {"by": provenance.BY_FOLDER} for key in settings}


def read_weights(path, where):
    """model.safetensors -> state_dict (CPU tensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserInputError(f"cannot read {where}/{WEIGHTS_FILE} (truncated or not a safetensors file?): "
                             f"{text}") from None
