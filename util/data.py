"""ImageFolder datasets with the ADM centre crop, checked up front with clear errors.

Layout (ImageNet's, and any dataset of your own):

    DATA_PATH/train/<class name>/<image>.{png,jpg,...}
    DATA_PATH/val/<class name>/<image>.{png,jpg,...}

Classes are the sub-folders in sorted order (torchvision's ImageFolder), so label k is
the k-th folder name.
"""
import functools
import os

import torch
from PIL import Image
from torchvision import datasets, transforms

from models.layers import PIXEL_MEAN, PIXEL_STD
from util.crop import center_crop_arr
from util.misc import UserInputError


class UnreadableImageError(UserInputError):
    """An image file that PIL cannot decode."""


def load_rgb(path):
    """ImageFolder loader that names the file when it cannot be decoded."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for damaged files
        raise UnreadableImageError(f"cannot read image {path} ({type(e).__name__}: {e}); "
                                   f"remove or replace the file") from None


def build_transform(img_size, train):
    """ADM centre crop to img_size, random horizontal flip (train only), ImageNet normalisation."""
    steps = [functools.partial(center_crop_arr, image_size=img_size)]  # partial pickles for workers
    if train:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(PIXEL_MEAN, PIXEL_STD)]
    return transforms.Compose(steps)


def split_dir(data_path, split):
    """DATA_PATH/split, checked to exist and hold at least one class folder."""
    if not data_path or not os.path.isdir(data_path):
        raise UserInputError(f"--data_path {data_path!r} is not a folder; point it at a dataset with "
                             f"train/ and val/ sub-folders of class folders")
    folder = os.path.join(data_path, split)
    if not os.path.isdir(folder):
        raise UserInputError(f"{folder} does not exist; --data_path needs a {split}/ folder with one "
                             f"sub-folder of images per class")
    if not any(entry.is_dir() for entry in os.scandir(folder)):
        raise UserInputError(f"{folder} holds no class folders; put the images in one sub-folder per "
                             f"class, e.g. {os.path.join(folder, 'cat', '0001.png')}")
    return folder


def build_dataset(data_path, split, img_size, train):
    """ImageFolder over DATA_PATH/split with the training or evaluation transform."""
    folder = split_dir(data_path, split)
    try:
        dataset = datasets.ImageFolder(folder, transform=build_transform(img_size, train), loader=load_rgb)
    except FileNotFoundError as e:  # ImageFolder: a class folder without any image
        raise UserInputError(f"{folder}: {str(e).rstrip('.')}; every class folder needs at least one image") from None
    return dataset


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
