"""FID, Inception Score and precision/recall with torch-fidelity's Inception-v3.

torch-fidelity (PyPI) compares two image sets; FractalGen, like ADM, compares generated
images with *precomputed* reference statistics (an `.npz` with the mean `mu` (2048,) and
covariance `sigma` (2048, 2048) of Inception pool features). So we run torch-fidelity's
feature extractor ("inception-v3-compat", bit-compatible with the TF-Inception used by
ADM) ourselves and feed its metric functions:

- FID: pool features "2048" -> (mu, sigma) -> Frechet distance to the reference file.
- IS: "logits_unbiased" -> Inception Score (10 splits of the images in id order, shuffled
  with torch-fidelity's fixed seed, exactly as its `calculate_metrics` does on a folder).
- precision/recall (optional): k-NN manifolds (k=3) of generated vs real pool features;
  the real images come from a folder. Like ADM's evaluator we use the Inception pool
  features, not torch-fidelity's default VGG-16, so one network serves every metric.

With several processes every rank extracts the features of its own images and the
features are gathered (`FeatureBank`), so no rank waits while another scores them all.
The Inception weights are loaded with `weights_only=True` by us, never by torch-fidelity.

Reference statistics for your own data: `python -m util.fid_stats --images DIR --out FILE.npz`.

The metrics are defined for RGB images. Other images are shown to Inception as RGB
(`inception_rgb`), generated ones and reference files alike: grey is copied to R, G and B;
transparent images (grey + alpha, RGBA) are composited over white first. So the FID of an
RGBA model measures its images as they look on a white page, against reference statistics
computed the same way from RGBA files; models with more than four channels have no FID.
"""
import io
import os
import zipfile

import numpy as np
import torch
from PIL import Image

import util.misc as misc
from util.checkpoint import safe_load
from util.crop import center_crop_arr
from util.data import ALPHA_MODES, load_image_as, load_rgb  # name the file when an image cannot be decoded
from util.misc import UserInputError

FID_FEATURE = "2048"             # Inception pool3 features
IS_FEATURE = "logits_unbiased"   # Inception logits (1008 classes, no bias) for IS
FEATURE_DIMS = {FID_FEATURE: 2048, IS_FEATURE: 1008}
FEATURE_BATCH = 64               # images per Inception forward (torch-fidelity's default)
PRC_NEIGHBOURS = 3
IS_SPLITS = 10
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's release file
BACKGROUND = 255  # transparent pixels are composited over white before Inception sees them
RGB_VIEWS = {1: "grey copied to R, G and B", 2: "grey + alpha composited over white, then copied to R, G and B",
             3: "as they are", 4: "RGBA composited over white"}


def rgb_view(channels):
    """How `inception_rgb` shows images of `channels` channels to Inception, in words;
    UserInputError for counts it cannot show (no FID / IS for them)."""
    if channels not in RGB_VIEWS:
        raise UserInputError(f"FID / Inception Score are defined for RGB images; {channels}-channel images have no "
                             f"RGB view (1 grey, 2 grey + alpha, 3 RGB or 4 RGBA can be scored); evaluate bits/dim "
                             f"with --evaluate_nll instead")
    return RGB_VIEWS[channels]


def inception_rgb(images):
    """uint8 (B, C, H, W) -> the uint8 (B, 3, H, W) Inception sees: RGB as it is; grey (C=1)
    copied to R, G and B; with alpha (C=2 grey + alpha, C=4 RGBA) the colour composited over
    white first, round((colour * alpha + 255 * (255 - alpha)) / 255) in integers. Other
    channel counts raise UserInputError."""
    channels = images.shape[1]
    rgb_view(channels)
    if channels == 3:
        return images
    colour = images
    if channels in (2, 4):
        colour, alpha = images[:, :-1].int(), images[:, -1:].int()
        # (x + 127) // 255 is round(x / 255): x / 255 never ends in .5, 255 being odd
        colour = ((colour * alpha + BACKGROUND * (255 - alpha) + 127) // 255).to(torch.uint8)
    return colour.expand(-1, 3, -1, -1) if colour.shape[1] == 1 else colour


def default_stats_path(img_size):
    """The official reference statistics for ImageNet at this resolution."""
    return os.path.join("fid_stats", f"adm_in{img_size}_stats.npz")


def check_stats_file(path):
    """Fail early (before generating anything) when the reference statistics are missing."""
    if not os.path.isfile(path):
        raise UserInputError(
            f"FID reference statistics {path} not found; pass --fid_stats_path FILE.npz, or write one "
            f"from real images with `python -m util.fid_stats --images DIR --out {path}`")


def load_stats(path):
    """(mu (2048,), sigma (2048, 2048)) float64 from an npz with finite `mu` and `sigma`."""
    check_stats_file(path)
    fix = "write it again with `python -m util.fid_stats`"
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = f["mu"], f["sigma"]
    except KeyError:
        raise UserInputError(f"{path} lacks the arrays 'mu' and 'sigma'; {fix}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # not an npz, cut, or pickled objects
        raise UserInputError(f"cannot read FID statistics {path} ({e}); {fix}") from None
    dims = FEATURE_DIMS[FID_FEATURE]
    if mu.shape != (dims,) or sigma.shape != (dims, dims):
        raise UserInputError(f"{path}: expected Inception statistics mu ({dims},) and sigma ({dims}, {dims}), "
                             f"got {mu.shape} and {sigma.shape}; {fix}")
    if not (np.issubdtype(mu.dtype, np.number) and np.issubdtype(sigma.dtype, np.number)):
        raise UserInputError(f"{path}: mu and sigma must be numeric arrays, got {mu.dtype} and {sigma.dtype}; {fix}")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserInputError(f"{path}: mu or sigma holds NaN or infinite values; {fix}")
    return mu, sigma


def save_stats(path, mu, sigma):
    """Write `mu`, `sigma` to an npz atomically (temp file + rename)."""
    # np.savez appends .npz to names without it
    with misc.replacing(path, tmp=f"{path}.tmp-{os.getpid()}.npz") as tmp:
        np.savez(tmp, mu=mu, sigma=sigma)


# ---------------------------------------------------------------------- Inception
def inception_weights_file():
    """torch-fidelity's Inception weights in the torch hub cache (where torch-fidelity
    itself keeps them), downloaded on first use."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:  # writes a temporary file and renames it: a broken download leaves nothing behind
            torch.hub.download_url_to_file(URL_INCEPTION_V3, path, progress=misc.is_main_process())
        except OSError as e:  # no network: urllib's URLError is an OSError
            raise UserInputError(f"cannot download the Inception weights ({e}); download {URL_INCEPTION_V3} "
                                 f"elsewhere and pass --inception_weights PATH") from None
    return path


def load_inception_state(weights_path=None):
    """The Inception state dict, loaded with weights_only=True from `weights_path`, or
    (None) from torch-fidelity's release file, downloaded once into the torch hub cache."""
    path = inception_weights_file() if weights_path is None else weights_path
    if not os.path.isfile(path):
        raise UserInputError(f"--inception_weights {path} does not exist; give the path to torch-fidelity's "
                             f"{INCEPTION_FILE}")
    state = safe_load(path, "Inception weights")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserInputError(f"{path} is not an Inception state_dict (a dict of tensors); give the path to "
                             f"torch-fidelity's {INCEPTION_FILE}")
    return state


def check_prc_ref_dir(path, num_images):
    """Precision/recall's real images: a folder with more than k (3) images, and more
    than k generated ones. Returns the number of real images."""
    real = len(list_images(path))
    if min(real, num_images) <= PRC_NEIGHBOURS:
        raise UserInputError(f"precision/recall need more than {PRC_NEIGHBOURS} generated and real images "
                             f"(--num_images {num_images}, {real} in --prc_ref_dir {path})")
    return real


def check_inception_weights(path=None):
    """Load the Inception weights (`path`, or None: torch-fidelity's file, downloaded once
    into the torch hub cache) with weights_only=True and check every key and shape against
    torch-fidelity's Inception-v3 (built on the CPU and dropped again, about a second)."""
    build_inception(torch.device("cpu"), path)


def build_inception(device, weights_path=None):
    """torch-fidelity's Inception-v3 on `device`, producing pool features and logits.
    weights_path: a local copy of the weights (offline machines, tests); None downloads
    torch-fidelity's file once. Wrong keys or shapes raise UserInputError.

    torch-fidelity's constructor unpickles its weights file with weights_only=False. It
    never sees the user's file: it gets bytes we serialised from the tensors loaded safely
    above, so nothing but tensors reaches its unpickler."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    state = load_inception_state(weights_path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        with torch.device(device):  # parameters are created where they will live
            model = FeatureExtractorInceptionV3("inception-v3-compat", [FID_FEATURE, IS_FEATURE],
                                                feature_extractor_weights_path=buffer, verbose=False)
    except RuntimeError as e:  # load_state_dict: missing or unexpected keys, wrong shapes
        detail = str(e).strip().splitlines()[-1].strip()[:200]
        raise UserInputError(f"{weights_path or INCEPTION_FILE} does not fit torch-fidelity's Inception-v3 "
                             f"({detail}); give the path to {INCEPTION_FILE}") from None
    return model.eval()


# ---------------------------------------------------------------------- features
def list_images(folder):
    """Every image file under `folder` (recursively), sorted."""
    if not os.path.isdir(folder):
        raise UserInputError(f"image folder {folder} does not exist")
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(folder)
                   for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise UserInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}")
    return files


def read_for_inception(path):
    """An image file -> PIL image: RGBA when it has transparency (alpha, or a palette's
    transparent colour), else RGB (`inception_rgb` composites the RGBA ones)."""
    with open(path, "rb") as f:
        try:
            with Image.open(f) as img:
                transparent = img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)
        except (OSError, ValueError, SyntaxError):
            transparent = False  # load_rgb names the file
    return load_image_as(path, "RGBA") if transparent else load_rgb(path)


class ImageFiles(torch.utils.data.Dataset):
    """Image files -> uint8 (3, H, W) as Inception sees them (`inception_rgb`), optionally
    ADM-centre-cropped to img_size."""

    def __init__(self, files, img_size=None):
        self.files, self.img_size = files, img_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        image = read_for_inception(self.files[i])
        if self.img_size is not None:
            image = center_crop_arr(image, self.img_size)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3 or 4, H, W) uint8
        return inception_rgb(pixels.unsqueeze(0))[0]


class FeatureBank:
    """Inception features of images as they come (generated batches, batches of files),
    each row tagged with its image id, so that the features of all ranks can be put
    together in id order: the order in which torch-fidelity reads a folder of files
    named by id, which the Inception Score's splits depend on."""

    def __init__(self, inception, batch_size=FEATURE_BATCH):
        self.inception, self.batch_size = inception, batch_size
        self.device = next(inception.parameters()).device
        self.ids, self.rows = [], {name: [] for name in FEATURE_DIMS}

    @torch.no_grad()
    def add(self, images, ids):
        """images: uint8 (B, C, H, W) on any device (seen as `inception_rgb` makes them);
        ids: B image ids."""
        self.ids.append(torch.as_tensor(list(ids), dtype=torch.int64))
        for chunk in inception_rgb(images).split(self.batch_size):
            features = self.inception(chunk.to(self.device))  # one tensor per name, (b, D)
            for name, value in zip((FID_FEATURE, IS_FEATURE), features):
                self.rows[name].append(value.float().cpu())

    def local(self):
        """This rank's (ids (n,), {name: (n, D)}) in the order added."""
        ids = torch.cat(self.ids) if self.ids else torch.zeros(0, dtype=torch.int64)
        rows = {name: torch.cat(values) if values else torch.zeros(0, FEATURE_DIMS[name])
                for name, values in self.rows.items()}
        return ids, rows

    def gather(self, device):
        """Every rank's features, {name: (N, D)} float32 on the CPU in image-id order, on
        every rank (`device`: where the collective runs). The ids must be 0..N-1, each once."""
        ids, rows = self.local()
        ids = misc.all_gather_rows(ids, device)
        order = ids.argsort()
        if not torch.equal(ids[order], torch.arange(len(ids))):
            raise RuntimeError(f"image ids gathered from {misc.get_world_size()} rank(s) are not 0..{len(ids) - 1} "
                               f"each once")
        return {name: misc.all_gather_rows(value, device)[order] for name, value in rows.items()}


def extract_features(files, inception, device, batch_size=FEATURE_BATCH, img_size=None, num_workers=0):
    """Inception features of image files -> {"2048": (N, 2048), "logits_unbiased": (N, 1008)}
    float32 on the CPU, in file order. Images of a batch must share one size (pass img_size
    to crop). With several processes every rank reads every world_size-th file and all ranks
    get all the features."""
    rank, world_size = misc.get_rank(), misc.get_world_size()
    mine = list(range(rank, len(files), world_size))
    loader = torch.utils.data.DataLoader(ImageFiles([files[i] for i in mine], img_size), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_stack_same_size)
    bank = FeatureBank(inception, batch_size)
    start = 0
    for batch in misc.progress(loader, "Inception features", unit="batch"):
        bank.add(batch, mine[start:start + len(batch)])
        start += len(batch)
    return bank.gather(device)


def _stack_same_size(images):
    sizes = {tuple(image.shape) for image in images}
    if len(sizes) > 1:
        raise UserInputError(f"images of different sizes {sorted(sizes)[:3]} in one batch; pass "
                             f"--img_size to centre-crop them all to one size")
    return torch.stack(images)


# ---------------------------------------------------------------------- metrics
def mean_and_cov(features):
    """(N, D) features -> (mu (D,), sigma (D, D)) float64, as torch-fidelity computes them."""
    from torch_fidelity.metric_fid import fid_features_to_statistics
    if features.shape[0] < 2:
        raise UserInputError(f"FID statistics need at least 2 images, got {features.shape[0]}")
    stats = fid_features_to_statistics(features.double())
    return stats["mu"], stats["sigma"]


def frechet_distance(stats_a, stats_b):
    """FID between two (mu, sigma) pairs (torch-fidelity's formula)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    (mu_a, sigma_a), (mu_b, sigma_b) = stats_a, stats_b
    if mu_a.shape != mu_b.shape:
        raise UserInputError(f"FID statistics of different feature sizes: {mu_a.shape} vs {mu_b.shape}")
    metric = fid_statistics_to_metric({"mu": mu_a.astype(np.float64), "sigma": sigma_a.astype(np.float64)},
                                      {"mu": mu_b.astype(np.float64), "sigma": sigma_b.astype(np.float64)},
                                      verbose=False)
    return float(metric[KEY_METRIC_FID])


def inception_score(logits, splits=IS_SPLITS):
    """(mean, std) Inception Score over `splits` splits of (N, 1008) logits."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    metric = isc_features_to_metric(logits, splits=min(splits, logits.shape[0]))
    return metric[KEY_METRIC_ISC_MEAN], metric[KEY_METRIC_ISC_STD]


def precision_recall(generated, real, neighbours=PRC_NEIGHBOURS):
    """Improved precision and recall (Kynkaanniemi et al. 2019) with torch-fidelity's code."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
    if min(generated.shape[0], real.shape[0]) <= neighbours:
        raise UserInputError(f"precision/recall needs more than {neighbours} generated and reference images")
    metric = prc_features_to_metric(generated, real, prc_neighborhood=neighbours, verbose=False)
    return metric[KEY_METRIC_PRECISION], metric[KEY_METRIC_RECALL]


def compute_metrics(features, reference, real_features=None):
    """FID of `features` (gathered, in id order) against `reference` (mu, sigma) and
    Inception Score; precision and recall too when the real images' features are given.
    Returns a dict of floats."""
    fid = frechet_distance(mean_and_cov(features[FID_FEATURE]), reference)
    is_mean, is_std = inception_score(features[IS_FEATURE])
    metrics = {"fid": fid, "inception_score": is_mean, "inception_score_std": is_std}
    if real_features is not None:
        metrics["precision"], metrics["recall"] = precision_recall(features[FID_FEATURE], real_features[FID_FEATURE])
    return metrics


class Scorer:
    """What scoring generated images needs, loaded once and reused for every batch of
    images (one `--evaluate_gen`, each setting of a sweep): the Inception network, the
    reference statistics and, for precision/recall, the real images' features.

    inception: a network from build_inception to share, None builds one (weights_path).
    prc_ref_dir: a folder of real images (centre-cropped to img_size), features extracted
    once by all ranks together."""

    def __init__(self, device, stats_path, weights_path=None, prc_ref_dir=None, img_size=None, num_workers=0,
                 inception=None):
        self.device = device
        self.inception = inception if inception is not None else build_inception(device, weights_path)
        self.reference = load_stats(stats_path) if misc.is_main_process() else None  # scored on rank 0
        self.real = None
        if prc_ref_dir:
            self.real = extract_features(list_images(prc_ref_dir), self.inception, device, img_size=img_size,
                                         num_workers=num_workers)

    def feature_bank(self):
        """An empty FeatureBank for one set of generated images."""
        return FeatureBank(self.inception)

    def score(self, bank):
        """FID, IS (and precision/recall) of the images in `bank` (every rank's, gathered
        in id order): a dict of floats on rank 0, {} on the other ranks (all ranks call)."""
        gathered = bank.gather(self.device)
        return compute_metrics(gathered, self.reference, self.real) if misc.is_main_process() else {}


def evaluate_folder(folder, stats_path, device, weights_path=None, prc_ref_dir=None, batch_size=FEATURE_BATCH,
                    img_size=None, num_workers=0):
    """FID (vs `stats_path`) and Inception Score of the images in `folder`; precision and
    recall too when `prc_ref_dir` (a folder of real images, centre-cropped to img_size)
    is given. Returns a dict of floats (on rank 0; {} on the others when run by several
    processes, which share the feature extraction)."""
    reference = load_stats(stats_path)
    inception = build_inception(device, weights_path)
    features = extract_features(list_images(folder), inception, device, batch_size, num_workers=num_workers)
    real = None
    if prc_ref_dir:
        real = extract_features(list_images(prc_ref_dir), inception, device, batch_size, img_size, num_workers)
    return compute_metrics(features, reference, real) if misc.is_main_process() else {}
