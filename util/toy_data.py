"""A tiny procedurally drawn, class-conditional image dataset for the quickstart.

Each class is one coloured shape (red circle, green square, ...) on a random dark
background, with a little jitter in position, size and colour, so classes are easy to tell
apart by eye and a tiny model learns them in minutes on a CPU. The dataset is written as
an ImageFolder tree (root/train/<class>/*.png, root/val/<class>/*.png) that the real
training script reads like ImageNet; with `unlabelled` the same shapes lie directly in
root/train and root/val, without class folders (one class: an unconditional model).

    python -m util.toy_data --root quickstart_out/data
    python -m util.toy_data --root shapes_unlabelled --unlabelled
    python -m util.toy_data --root toy_grey --mode L        # greyscale PNGs
    python -m util.toy_data --root toy_rgba --mode RGBA     # shapes on a transparent background

In the RGBA variant the background is fully transparent (alpha 0, colour 0) and each shape
is drawn with an alpha from SHAPE_ALPHAS; the greyscale variant is the RGB image's luma.
"""
import json
import os
import shutil

import numpy as np
from PIL import Image

from util import cli

# (folder name, RGB colour, shape). Folder names start with the class index so that
# ImageFolder's alphabetical class order is this order.
CLASSES = (
    ("0_red_circle", (230, 40, 40), "circle"),
    ("1_green_square", (40, 200, 70), "square"),
    ("2_blue_triangle", (60, 110, 255), "triangle"),
    ("3_yellow_cross", (240, 220, 40), "cross"),
    ("4_magenta_ring", (230, 60, 220), "ring"),
    ("5_white_diamond", (235, 235, 235), "diamond"),
)
# Dark backgrounds, one picked per image. A small palette (rather than any dark colour)
# keeps each channel to a handful of values, which a tiny model learns in minutes; with
# free colours it would spend its capacity on copying exact 8-bit values.
BACKGROUNDS = ((12, 12, 16), (40, 20, 56), (16, 44, 36), (56, 40, 16))
CONFIG_FILE = "toy_data.json"
MODES = ("RGB", "L", "RGBA")
SHAPE_ALPHAS = (255, 160)  # RGBA variant: opaque or translucent shapes


def class_names(num_classes):
    """Readable names ('red circle', ...) of the first `num_classes` classes."""
    return [name.split("_", 1)[1].replace("_", " ") for name, _, _ in CLASSES[:num_classes]]


def shape_mask(shape, size, cx, cy, r):
    """Boolean (size, size) mask of `shape` centred at (cx, cy) with radius r (pixels).

    Pixels are tested at their centres; lone one-pixel spikes (at most one neighbour
    inside) are then trimmed, since at 16x16 they read as noise rather than shape."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    inside = _inside(shape, xs, ys, cx, cy, r)
    for _ in range(2):  # twice: a spike two pixels long goes too
        padded = np.pad(inside, 1)
        neighbours = (padded[:-2, 1:-1].astype(int) + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:])
        inside = inside & (neighbours >= 2)
    return inside


def _inside(shape, xs, ys, cx, cy, r):
    """Which points (xs, ys) lie inside the shape."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "square":
        return np.maximum(abs(dx), abs(dy)) <= 0.8 * r
    if shape == "triangle":  # apex up, base at cy + 0.8 r, half-width r at the base
        height = 1.8 * r
        t = (dy + r) / height  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (abs(dx) <= r * t)
    if shape == "cross":
        arm = max(0.3 * r, 1.0)
        return ((abs(dx) <= arm) & (abs(dy) <= r)) | ((abs(dy) <= arm) & (abs(dx) <= r))
    if shape == "ring":
        d2 = dx ** 2 + dy ** 2
        return (d2 <= r ** 2) & (d2 >= (0.5 * r) ** 2)
    if shape == "diamond":
        return abs(dx) + abs(dy) <= 1.1 * r
    raise ValueError(f"unknown shape {shape!r}")


def render(class_idx, rng, size=16, mode="RGB"):
    """Draw one image of class `class_idx` -> uint8 (size, size, 3) for RGB: the class's
    shape and colour on a random palette background, with jittered position and size;
    (size, size) for L (its luma); (size, size, 4) for RGBA (transparent background)."""
    _, colour, shape = CLASSES[class_idx]
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    r = size * rng.uniform(0.28, 0.38)
    cx, cy = size / 2 + rng.uniform(-0.1, 0.1, size=2) * size
    inside = shape_mask(shape, size, cx, cy, r)
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = background
    img[inside] = colour
    if mode == "L":
        return np.asarray(Image.fromarray(img).convert("L"))
    if mode == "RGBA":
        img = np.zeros((size, size, 4), dtype=np.uint8)
        img[inside] = (*colour, SHAPE_ALPHAS[rng.integers(len(SHAPE_ALPHAS))])
    return img


def make_split(root, split, per_class, num_classes, size, seed, unlabelled=False, mode="RGB"):
    """Write root/split/<class>/<index>.png (unlabelled: root/split/<class>_<index>.png, the
    same images) in `mode`; deterministic in (seed, split)."""
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}[split]])
    for c in range(num_classes):
        folder = os.path.join(root, split) if unlabelled else os.path.join(root, split, CLASSES[c][0])
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            name = f"{c}_{i:05d}.png" if unlabelled else f"{i:05d}.png"
            Image.fromarray(render(c, rng, size, mode)).save(os.path.join(folder, name))


def make_dataset(root, num_classes=4, num_train_per_class=400, num_val_per_class=50, size=16, seed=0,
                 unlabelled=False, mode="RGB"):
    """Write the ImageFolder dataset under `root` (train/ and val/) as PNGs of `mode` (RGB,
    L or RGBA) and return `root`; `unlabelled` writes the images without class folders.

    A dataset already written with the same settings is reused; different settings
    replace it.
    """
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be between 1 and {len(CLASSES)}, got {num_classes}")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels to draw recognisable shapes, got {size}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    config = dict(num_classes=num_classes, num_train_per_class=num_train_per_class,
                  num_val_per_class=num_val_per_class, size=size, seed=seed, version=2)
    if unlabelled:  # only then: datasets written before keep their config (and are reused)
        config["unlabelled"] = True
    if mode != "RGB":  # RGB datasets written before the mode existed stay valid
        config["mode"] = mode
    config_path = os.path.join(root, CONFIG_FILE)
    if os.path.exists(config_path):
        with open(config_path) as f:
            if json.load(f) == config:
                return root
    for split in ("train", "val"):
        shutil.rmtree(os.path.join(root, split), ignore_errors=True)
    make_split(root, "train", num_train_per_class, num_classes, size, seed, unlabelled, mode)
    make_split(root, "val", num_val_per_class, num_classes, size, seed, unlabelled, mode)
    with open(config_path, "w") as f:  # written last: marks the dataset complete
        json.dump(config, f)
    return root


def main(argv=None):
    parser = cli.ArgumentParser(description="Write the toy coloured-shapes ImageFolder dataset.")
    parser.add_argument("--root", default="quickstart_out/data")
    parser.add_argument("--num_classes", type=int, default=4)
    parser.add_argument("--num_train_per_class", type=int, default=400)
    parser.add_argument("--num_val_per_class", type=int, default=50)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unlabelled", action="store_true",
                        help="the images directly in train/ and val/, without class folders (one class)")
    parser.add_argument("--mode", default="RGB", choices=MODES,
                        help="PNG mode: RGB, L (greyscale) or RGBA (shapes on a transparent background)")
    args = parser.parse_args(argv)
    make_dataset(args.root, args.num_classes, args.num_train_per_class, args.num_val_per_class,
                 args.size, args.seed, args.unlabelled, args.mode)
    layout = ", without class folders" if args.unlabelled else ""
    print(f"wrote {args.root}/train and {args.root}/val ({', '.join(class_names(args.num_classes))}{layout})")


if __name__ == "__main__":
    main()
