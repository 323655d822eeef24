"""ImageFolder datasets with the ADM centre crop, checked up front with clear errors.

Layout (ImageNet's, and any dataset of your own):

    DATA_PATH/train/<class name>/<image>.{png,jpg,...}
    DATA_PATH/val/<class name>/<image>.{png,jpg,...}

Classes are the sub-folders in sorted order (torchvision's ImageFolder), so label k is
the k-th folder name. A split that holds its images directly, without class folders
(FFHQ, LSUN, most in-house data), is one class: every image has label 0, and the model
trained on it is unconditional. A split that mixes loose images with class folders is
refused.

Images are read in the mode of the model's channel count (`IMAGE_MODES`: 1 L, 2 LA, 3 RGB,
4 RGBA) with PIL's conversions (colour to grey: ITU-R 601-2 luma; dropping alpha keeps the
colour values; adding alpha makes the image opaque; a palette with transparency becomes
RGBA first). `build_dataset` says once, from a sample of the files, which conversions the
data needs. A model with more than four channels has no image file mode: it is refused.

Training and `python -m util.check_data` find and read images with the same two functions,
so they treat every file alike: `image_files` follows symlinked folders as ImageFolder does
but refuses a symlink loop (which would read the same images again and again), and
`read_image` decodes an image to 8 bits per channel, scaling 16-bit and float images instead of
clipping them (before the conversion to the model's mode), and refusing decompression bombs.
"""
import functools
import os
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from models.layers import PIXEL_MEAN, PIXEL_STD
from util.crop import center_crop_arr
from util.misc import UserInputError, print0

IMAGE_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}  # PIL mode of each channel count
MODE_SAMPLE = 64  # files whose mode build_dataset looks at to say what it converts


class UnreadableImageError(UserInputError):
    """An image file that PIL cannot decode (or will not: a decompression bomb)."""


def image_mode(channels, what="a model"):
    """The PIL mode of `channels` channels; one sentence for a count no image file holds."""
    if channels not in IMAGE_MODES:
        raise UserInputError(f"{what} with {channels} channels has no image file mode (PNG and JPEG hold 1 to 4 "
                             f"channels: L, LA, RGB, RGBA); feed it tensors from a Dataset of your own "
                             f"(docs/your-own-data.md)")
    return IMAGE_MODES[channels]


def convert_mode(img, mode):
    """A PIL image in `mode` (see the module docstring for the conversions)."""
    if img.mode == mode:
        return img
    if mode in ("LA", "RGBA") and img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # the palette's transparency becomes alpha
    return img.convert(mode)


class SymlinkLoopError(UserInputError):
    """A symlinked folder that leads back to a folder containing it."""


# How images of other modes become 8-bit RGB (read_image), as check_data reports it
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def read_rgb(path):
    """read_image(path, "RGB"): (8-bit RGB PIL image, how it was converted or None)."""
    return read_image(path, "RGB")


def load_image_as(path, mode="RGB"):
    """ImageFolder loader (training and NLL): the image of read_image(path, mode)."""
    return read_image(path, mode)[0]


def load_rgb(path):
    """load_image_as(path, "RGB")."""
    return load_image_as(path, "RGB")


def read_image(path, mode="RGB"):
    """Decode an image file to 8 bits per channel in PIL `mode`. Returns (image, note): note
    says how an RGB read converted the file (None for 8-bit RGB), e.g. '16-bit grey (I;16):
    scaled to 8 bits'. 16-bit grey is scaled (PIL's convert would clip it: 60000 -> 255),
    float images in [0, 1] are scaled to [0, 255], before any conversion to `mode`. A file
    PIL cannot decode, or one of more pixels than PIL's decompression-bomb limit, raises
    UnreadableImageError naming it."""
    try:
        with warnings.catch_warnings(record=True) as caught, open(path, "rb") as f:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            image = Image.open(f)
            image.load()
        if mode == "RGB":
            image, note = _to_rgb(image)
        else:
            image, note = _to_8bit(image)
            image = convert_mode(image, mode)
    except Image.DecompressionBombError as e:
        raise UnreadableImageError(f"cannot read image {path}: it is a decompression bomb ({e}); PIL refuses "
                                   f"to decode it; remove it or make it smaller") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for damaged files
        raise UnreadableImageError(f"cannot read image {path} ({type(e).__name__}: {e}); "
                                   f"remove or replace the file") from None
    if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
        note = ", ".join(filter(None, [note, f"very large ({image.width}x{image.height} pixels, over PIL's "
                                              f"warning limit): decoded, slowly"]))
    return image, note


def _to_8bit(image):
    """(image with 8 bits per channel, how it was scaled or None): 16- and 32-bit grey are
    shifted down, float grey in [0, 1] scaled to [0, 255]; other modes are returned as they are."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image).astype(np.int64)
        bits = 16 if mode != "I" or values.max(initial=0) <= 0xFFFF else 32
        grey = (np.clip(values, 0, 2 ** bits - 1) >> (bits - 8)).astype(np.uint8)
        return Image.fromarray(grey, "L"), f"{bits}-bit grey ({mode}): scaled to 8 bits"
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255 if np.nanmax(values, initial=0) <= 1 else 1
        grey = np.clip(np.nan_to_num(values) * scale, 0, 255).round().astype(np.uint8)
        range_ = "[0, 1], scaled" if scale == 255 else "beyond [0, 1], clipped"
        return Image.fromarray(grey, "L"), f"float grey (F) in {range_} to 8 bits"
    return image, None


def _to_rgb(image):
    """(8-bit RGB image, how it was converted or None)."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    grey, note = _to_8bit(image)
    if note:
        return grey.convert("RGB"), note
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return image.convert("RGB"), f"{mode} with transparency: alpha dropped"
    what = {"L": "8-bit grey (L): copied to R, G and B", "P": "palette (P): colours looked up",
            "1": "black and white (1): expanded"}.get(mode, f"{mode}: converted by PIL")
    return image.convert("RGB"), what


def image_files(folder, loops=None):
    """Every file under `folder` with an ImageFolder image extension, in ImageFolder's
    order (folders by path, files by name). Symlinked folders are followed, as ImageFolder
    does, except one that leads back to a folder containing it: that raises
    SymlinkLoopError, or, when `loops` is a list, its sentence is appended and the link
    skipped."""
    found = []

    def visit(path):
        real = os.path.realpath(path)
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:  # unreadable: skipped, as os.walk does
            return
        names = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if not is_dir:
                names.append(entry.name)
                continue
            target = os.path.realpath(entry.path)
            if real == target or real.startswith(target.rstrip(os.sep) + os.sep):  # it contains this folder
                problem = (f"{entry.path} is a symlink loop: it leads back to {target}, which contains it, so the "
                           f"images below it would be read again and again; remove the link")
                if loops is None:
                    raise SymlinkLoopError(problem)
                loops.append(problem)
                continue
            visit(entry.path)
        found.append((path, [os.path.join(path, n) for n in names if n.lower().endswith(IMG_EXTENSIONS)]))

    visit(os.fspath(folder))
    return [file for _, files in sorted(found) for file in files]


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder (same classes, same files, same order) whose files come
    from `image_files`: a symlink loop is refused instead of read over and over."""

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        samples = []
        for name, index in sorted(class_to_idx.items()):
            files = image_files(os.path.join(directory, name))
            if not files and not allow_empty:
                raise FileNotFoundError(f"Found no valid file for the classes {name}")
            samples += [(file, index) for file in files]
        return samples


def build_transform(img_size, mean=PIXEL_MEAN, std=PIXEL_STD):
    """ADM centre crop to img_size, normalisation (default ImageNet's; one mean and std per
    channel). The training flip is not here but in `KeyedFlips`: a transform's randomness
    would depend on the worker's RNG."""
    steps = [functools.partial(center_crop_arr, image_size=img_size),  # partial pickles for workers
             transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "F")


def conversion_note(source, mode):
    """How an image of PIL mode `source` becomes `mode`, in words (None: it does not change)."""
    if source == mode:
        return None
    parts = []
    if mode in ("L", "LA") and source not in GREY_MODES:
        parts.append("colour becomes grey (ITU-R 601-2 luma)")
    if mode in ("RGB", "RGBA") and source in GREY_MODES:
        parts.append("grey is copied to R, G and B")
    if source in ALPHA_MODES and mode not in ALPHA_MODES:
        parts.append("alpha is dropped (the colour under it is kept)")
    if mode in ALPHA_MODES and source not in ALPHA_MODES:
        parts.append("alpha is added: opaque, except a palette's transparent colour" if source == "P" else
                     "alpha is added, fully opaque")
    return "; ".join(parts) or f"PIL converts {source} to {mode}"


def describe_conversions(samples, mode, root, limit=MODE_SAMPLE):
    """Say once (rank 0) what reading the images in `mode` does to them, judged from the
    modes of up to `limit` files spread over the dataset (file headers only)."""
    if not samples:
        return
    step = max(1, len(samples) // limit)
    modes = {}
    for path, _ in samples[::step][:limit]:
        try:
            with Image.open(path) as img:
                modes[img.mode] = modes.get(img.mode, 0) + 1
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue  # the loader names an unreadable file when it meets it
    checked = sum(modes.values())
    for source, count in sorted(modes.items()):
        note = conversion_note(source, mode)
        if note:
            print0(f"{root}: {count} of {checked} sampled images are {source}; they are read as {mode} for this "
                   f"{len(mode)}-channel model: {note}")


def flips(seed, epoch, index):
    """Whether sample `index` is mirrored in `epoch`: a fair coin drawn from (seed, epoch,
    index) alone, so it is the same whichever worker loads the sample, and when."""
    return bool(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0] & 1)


class KeyedFlips(torch.utils.data.Dataset):
    """A training ImageFolder (built without random flips) indexed by (epoch, index) keys,
    which `ResumableSampler` yields; mirrors each image as `flips(seed, epoch, index)` says.
    Flipping the normalised tensor equals flipping the image first (both act per pixel)."""

    def __init__(self, images, seed):
        self.images, self.seed = images, seed
        self.root, self.classes = images.root, images.classes
        self.unlabelled = getattr(images, "unlabelled", False)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        epoch, index = key
        image, label = self.images[index]
        if flips(self.seed, epoch, index):
            image = image.flip(-1)  # (3, H, W): mirror the columns
        return image, label


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (same order: a seeded shuffle per epoch, one shard per rank) that
    yields (epoch, index) keys for `KeyedFlips` and can start an epoch part-way:
    `set_epoch(epoch, skip)` drops the shard's first `skip` samples, without loading them.
    With the flips keyed the same way, the rest of the epoch is exactly what an
    uninterrupted run sees: the position in the epoch is all a checkpoint needs to hold."""

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        indices = list(super().__iter__())[getattr(self, "skip", 0):]
        return iter([(self.epoch, index) for index in indices])

    def __len__(self):
        return self.num_samples - getattr(self, "skip", 0)


def split_dir(data_path, split):
    """DATA_PATH/split, checked to exist and to hold class folders or images (not both)."""
    if not data_path or not os.path.isdir(data_path):
        raise UserInputError(f"--data_path {data_path!r} is not a folder; point it at a dataset with "
                             f"train/ and val/ sub-folders of class folders (or of images, for one class)")
    folder = os.path.join(data_path, split)
    if not os.path.isdir(folder):
        raise UserInputError(f"{folder} does not exist; --data_path needs a {split}/ folder with one "
                             f"sub-folder of images per class (or the images themselves, for one class)")
    is_unlabelled(folder)
    return folder


def is_unlabelled(folder):
    """Whether `folder` (a split) holds its images directly: True for loose images (one
    class), False for class folders. Hidden folders (.ipynb_checkpoints) and files that are
    not images are not looked at; a mix of loose images and class folders, or neither,
    raises UserInputError."""
    entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    images = [e.name for e in entries if not e.is_dir() and e.name.lower().endswith(IMG_EXTENSIONS)]
    if classes and images:
        raise UserInputError(f"{folder} mixes {len(images)} loose image(s) (e.g. {images[0]}) with {len(classes)} "
                             f"class folder(s) (e.g. {classes[0]}/); put every image in a class folder, or move "
                             f"the class folders' images up into {folder} to train one class without labels")
    if not (classes or images):
        raise UserInputError(f"{folder} holds no class folders and no images; put the images in one sub-folder "
                             f"per class, e.g. {os.path.join(folder, 'cat', '0001.png')}, or directly in "
                             f"{folder} to train one class without labels")
    return bool(images)


def describe_split(folder):
    """One line on what a split folder holds, the same in training and util.check_data:
    its class folders, or images without them (one class: an unconditional model)."""
    if is_unlabelled(folder):
        count = len(UnlabelledFolder.make_dataset(folder))
        return (f"{folder} holds {count} images without class folders: one class, no labels (an unconditional "
                f"model; sampling without guidance, cfg 1)")
    classes = [e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")]
    return f"{folder} holds {len(classes)} class folder{'s' if len(classes) != 1 else ''}"


UNLABELLED_CLASS = "(unlabelled)"  # the class name of a split without class folders


class UnlabelledFolder(datasets.ImageFolder):
    """The images directly inside `root` (no class folders), as one class: label 0."""
    unlabelled = True

    def find_classes(self, directory):
        return [UNLABELLED_CLASS], {UNLABELLED_CLASS: 0}

    @staticmethod
    def make_dataset(directory, class_to_idx=None, extensions=None, is_valid_file=None, allow_empty=False):
        return [(entry.path, 0) for entry in sorted(os.scandir(directory), key=lambda entry: entry.name)
                if not entry.is_dir() and entry.name.lower().endswith(IMG_EXTENSIONS)]


def build_dataset(data_path, split, img_size, train, seed=0, channels=3, mean=PIXEL_MEAN, std=PIXEL_STD):
    """ImageFolder over DATA_PATH/split (or UnlabelledFolder, for a split without class
    folders) with the evaluation transform, images read with `channels` channels
    (IMAGE_MODES) and normalised with `mean`, `std`; for training wrapped in KeyedFlips
    (random flips drawn from `seed`, read with ResumableSampler's keys)."""
    mode = image_mode(channels)
    folder = split_dir(data_path, split)
    kind = UnlabelledFolder if is_unlabelled(folder) else ImageFolder
    loader = functools.partial(load_image_as, mode=mode)  # a partial pickles for DataLoader workers
    try:
        dataset = kind(folder, transform=build_transform(img_size, mean, std), loader=loader)
    except FileNotFoundError as e:  # ImageFolder: a class folder without any image
        raise UserInputError(f"{folder}: {str(e).rstrip('.')}; every class folder needs at least one image") from None
    describe_conversions(dataset.samples, mode, folder)
    return KeyedFlips(dataset, seed) if train else dataset


UPSCALE_SAMPLE = 32  # files whose header is read to tell whether a dataset is smaller than the model


def upscaling_warning(dataset, img_size, suggest=lambda size: (), sample=UPSCALE_SAMPLE):
    """A warning (one line) when most images are smaller than `img_size` and would each be
    upscaled; None otherwise. Reads the headers of up to `sample` files spread over the
    dataset. `suggest(size)`: names of models for images of that size, for the advice."""
    folder = getattr(dataset, "images", dataset)  # KeyedFlips wraps the ImageFolder
    paths = [path for path, _ in folder.samples]
    sides = []
    for path in paths[::max(1, len(paths) // sample)][:sample]:
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # unreadable: util.check_data reports those
            continue
    small = sorted(side for side in sides if side < img_size)
    if not sides or 2 * len(small) <= len(sides):
        return None
    typical = small[len(small) // 2]
    names = suggest(typical)
    advice = (f"a model for images of that size ({', '.join(names)}) fits them" if names else
              "larger images, or a model for smaller ones, fit better")
    return (f"warning: most images in {folder.root} are smaller than the model's {img_size}x{img_size} (short side "
            f"{typical} pixels), so each is upscaled about {img_size / typical:.0f}x and the model learns "
            f"interpolated pixels; {advice}")


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + world, rank + 2*world, ... in order.

    Unlike DistributedSampler it never pads the last shard with repeated images, so a sum
    over ranks counts every image exactly once (shards may differ in length by one)."""

    def __init__(self, num_samples, rank, world_size):
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
