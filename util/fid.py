"""FID, Inception Score and precision/recall with torch-fidelity's Inception-v3.

torch-fidelity (PyPI) compares two image sets; FractalGen, like ADM, compares generated
images with *precomputed* reference statistics (an `.npz` with the mean `mu` (2048,) and
covariance `sigma` (2048, 2048) of Inception pool features). So we run torch-fidelity's
feature extractor ("inception-v3-compat", bit-compatible with the TF-Inception used by
ADM) ourselves and feed its metric functions:

- FID: pool features "2048" -> (mu, sigma) -> Frechet distance to the reference file.
- IS: "logits_unbiased" -> Inception Score (10 splits).
- precision/recall (optional): k-NN manifolds (k=3) of generated vs real pool features;
  the real images come from a folder. Like ADM's evaluator we use the Inception pool
  features, not torch-fidelity's default VGG-16, so one network serves every metric.

Reference statistics for your own data: `python -m util.fid_stats --images DIR --out FILE.npz`.
"""
import os

import numpy as np
import torch

from util.crop import center_crop_arr
from util.data import load_rgb  # names the file when an image cannot be decoded
from util.misc import UserInputError

FID_FEATURE = "2048"             # Inception pool3 features
IS_FEATURE = "logits_unbiased"   # Inception logits (1008 classes, no bias) for IS
PRC_NEIGHBOURS = 3
IS_SPLITS = 10
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


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
    """(mu (D,), sigma (D, D)) float64 from an npz with `mu` and `sigma`."""
    check_stats_file(path)
    try:
        with np.load(path) as f:
            mu, sigma = f["mu"], f["sigma"]
    except KeyError:
        raise UserInputError(f"{path} lacks the arrays 'mu' and 'sigma'; write it with "
                             f"`python -m util.fid_stats`") from None
    except (OSError, ValueError) as e:
        raise UserInputError(f"cannot read FID statistics {path}: {e}") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserInputError(f"{path}: expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    return mu.astype(np.float64), sigma.astype(np.float64)


def save_stats(path, mu, sigma):
    """Write `mu`, `sigma` to an npz atomically (temp file + rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.npz"  # np.savez appends .npz to names without it
    try:
        np.savez(tmp, mu=mu, sigma=sigma)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------- features
def build_inception(device, weights_path=None):
    """torch-fidelity's Inception-v3 on `device`, producing pool features and logits.

    weights_path: a local copy of the weights (offline machines, tests); None downloads
    torch-fidelity's release file once into the torch hub cache."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    if weights_path is not None and not os.path.isfile(weights_path):
        raise UserInputError(f"--inception_weights {weights_path} does not exist; give the path to "
                             f"torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    try:
        model = FeatureExtractorInceptionV3("inception-v3-compat", [FID_FEATURE, IS_FEATURE],
                                            feature_extractor_weights_path=weights_path, verbose=False)
    except OSError as e:  # no network: urllib's URLError is an OSError
        raise UserInputError(f"cannot download the Inception weights ({e}); download them elsewhere and "
                             f"pass --inception_weights PATH") from None
    return model.to(device).eval()


def list_images(folder):
    """Every image file under `folder` (recursively), sorted."""
    if not os.path.isdir(folder):
        raise UserInputError(f"image folder {folder} does not exist")
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(folder)
                   for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise UserInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}")
    return files


class ImageFiles(torch.utils.data.Dataset):
    """Image files -> uint8 (3, H, W), optionally ADM-centre-cropped to img_size."""

    def __init__(self, files, img_size=None):
        self.files, self.img_size = files, img_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        image = load_rgb(self.files[i])
        if self.img_size is not None:
            image = center_crop_arr(image, self.img_size)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, H, W) uint8


@torch.no_grad()
def extract_features(files, inception, device, batch_size=64, img_size=None, num_workers=0):
    """Inception features of image files -> {"2048": (N, 2048), "logits_unbiased": (N, 1008)}
    float32 on the CPU. Images of a batch must share one size (pass img_size to crop)."""
    loader = torch.utils.data.DataLoader(ImageFiles(files, img_size), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_stack_same_size)
    out = {FID_FEATURE: [], IS_FEATURE: []}
    for batch in loader:
        features = inception(batch.to(device))
        for name, value in zip((FID_FEATURE, IS_FEATURE), features):
            out[name].append(value.float().cpu())
    return {name: torch.cat(values) for name, values in out.items()}


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


def evaluate_folder(folder, stats_path, device, weights_path=None, prc_ref_dir=None, batch_size=64,
                    img_size=None, num_workers=0):
    """FID (vs `stats_path`) and Inception Score of the images in `folder`; precision and
    recall too when `prc_ref_dir` (a folder of real images, centre-cropped to img_size)
    is given. Returns a dict of floats."""
    reference = load_stats(stats_path)
    inception = build_inception(device, weights_path)
    features = extract_features(list_images(folder), inception, device, batch_size, num_workers=num_workers)
    fid = frechet_distance(mean_and_cov(features[FID_FEATURE]), reference)
    is_mean, is_std = inception_score(features[IS_FEATURE])
    metrics = {"fid": fid, "inception_score": is_mean, "inception_score_std": is_std}
    if prc_ref_dir:
        real = extract_features(list_images(prc_ref_dir), inception, device, batch_size, img_size, num_workers)
        metrics["precision"], metrics["recall"] = precision_recall(features[FID_FEATURE], real[FID_FEATURE])
    return metrics
