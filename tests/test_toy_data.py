"""util/toy_data.py (the quickstart dataset) and util/masks.py (conditional-generation masks)."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from torchvision.datasets import ImageFolder

from util import masks, toy_data


def digest(root):
    """Hash of every file under root (names and bytes)."""
    h = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(folder, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_dataset_is_an_imagefolder_with_the_class_order(tmp_path):
    root = toy_data.make_dataset(tmp_path / "d", num_classes=3, num_train_per_class=5, num_val_per_class=2)
    train, val = ImageFolder(os.path.join(root, "train")), ImageFolder(os.path.join(root, "val"))
    assert len(train) == 15 and len(val) == 6
    assert train.classes == [name for name, _, _ in toy_data.CLASSES[:3]]
    assert toy_data.class_names(3) == ["red circle", "green square", "blue triangle"]
    image, label = train[0]
    assert image.size == (16, 16) and image.mode == "RGB" and label == 0


def test_dataset_is_deterministic_and_seeded(tmp_path):
    kwargs = dict(num_classes=2, num_train_per_class=4, num_val_per_class=2)
    a = digest(toy_data.make_dataset(tmp_path / "a", seed=1, **kwargs))
    b = digest(toy_data.make_dataset(tmp_path / "b", seed=1, **kwargs))
    c = digest(toy_data.make_dataset(tmp_path / "c", seed=2, **kwargs))
    assert a == b != c


def test_dataset_is_reused_or_replaced(tmp_path):
    root = tmp_path / "d"
    toy_data.make_dataset(root, num_classes=2, num_train_per_class=3, num_val_per_class=1)
    marker = root / "train" / "0_red_circle" / "00000.png"
    stamp = marker.stat().st_mtime_ns
    toy_data.make_dataset(root, num_classes=2, num_train_per_class=3, num_val_per_class=1)
    assert marker.stat().st_mtime_ns == stamp  # same settings: untouched
    toy_data.make_dataset(root, num_classes=3, num_train_per_class=2, num_val_per_class=1)
    assert len(ImageFolder(str(root / "train"))) == 6  # new settings: old files gone
    assert json.loads((root / toy_data.CONFIG_FILE).read_text())["num_classes"] == 3


def test_classes_are_easy_to_tell_apart():
    """Nearest class-mean of the shape colour (brightest pixels) classifies every image:
    the classes really differ by colour and shape, and shapes are drawn."""
    rng = np.random.default_rng(0)
    n = len(toy_data.CLASSES)
    images = [[toy_data.render(c, rng).astype(float) for _ in range(20)] for c in range(n)]

    def features(img):
        bright = img.sum(-1) > img.sum(-1).min() + 150  # the shape, not the dark background
        return np.concatenate([img[bright].mean(0) / 255, [bright.mean()]])

    feats = np.array([[features(im) for im in per_class] for per_class in images])  # (n, 20, 4)
    means = feats[:, :10].mean(1)
    test = feats[:, 10:].reshape(-1, 4)
    pred = np.linalg.norm(test[:, None] - means[None], axis=-1).argmin(1)
    assert (pred == np.repeat(np.arange(n), 10)).all()
    for per_class in images:  # shapes cover a sensible part of the image
        cover = np.mean([features(im)[-1] for im in per_class])
        assert 0.1 < cover < 0.6


def test_bad_dataset_settings_are_clear(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        toy_data.make_dataset(tmp_path, num_classes=99)
    with pytest.raises(ValueError, match="size"):
        toy_data.make_dataset(tmp_path, size=4)


@pytest.mark.parametrize("task", masks.TASKS)
def test_masks_shape_and_unknown_fraction(task):
    m = masks.make_mask(task, 16)
    assert m.shape == (1, 1, 16, 16) and m.dtype == torch.bool
    unknown = (~m).float().mean().item()
    expected = {"inpaint": 0.25, "outpaint": 0.75, "uncrop": 0.5, "edit": 0.25}[task]
    assert unknown == pytest.approx(expected)


def test_mask_geometry():
    inpaint = masks.inpaint_mask(8)
    assert not inpaint[0, 0, 2:6, 2:6].any() and inpaint.sum() == 64 - 16
    assert torch.equal(masks.outpaint_mask(8), ~inpaint)
    right = masks.uncrop_mask(8)
    assert right[..., :4].all() and not right[..., 4:].any()
    top = masks.uncrop_mask(8, frac=0.25, side="top")
    assert not top[..., :2, :].any() and top[..., 2:, :].all()
    # broadcasts to the (B, 3, H, W) known_mask of FractalGen.generate
    assert torch.broadcast_to(inpaint, (5, 3, 8, 8)).shape == (5, 3, 8, 8)


SIZES = (2, 3, 5, 8, 16, 17, 64)
FRACS = (0.01, 0.2, 0.25, 0.3, 0.5, 0.7, 0.75, 0.9, 0.99)


def expected_span(size, frac):
    """What a user asking for `frac` of the side gets: the nearest whole number of pixels,
    at least one, never the whole side."""
    ideal = size * frac
    span = min(max(1, round(ideal)), size - 1)
    assert abs(span - ideal) <= 0.5 or span in (1, size - 1)
    return span


def runs(flags):
    """(start, stop) of each run of True in a 1-D bool tensor."""
    edges = torch.diff(torch.cat([torch.tensor([0]), flags.int(), torch.tensor([0])]))
    return list(zip((edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()))


@pytest.mark.parametrize("side", masks.SIDES)
@pytest.mark.parametrize("size", SIZES)
def test_uncrop_hides_a_strip_of_frac_on_its_side(size, side):
    """For every size and fraction: the unknown part is one full strip touching `side`,
    as wide as the fraction asks (rounded, 1 .. size-1 pixels); the rest is known."""
    for frac in FRACS:
        unknown = ~masks.make_mask("uncrop", size, frac=frac, side=side)[0, 0]
        if side in ("top", "bottom"):
            unknown = unknown.t()  # strips of rows -> strips of columns
        columns = unknown.all(dim=0)
        assert torch.equal(unknown, columns.expand(size, size)), (frac, "not whole columns")
        (start, stop), = runs(columns)
        assert stop - start == expected_span(size, frac), frac
        at_the_end = side in ("right", "bottom")
        assert (stop == size) if at_the_end else (start == 0), (frac, start, stop)


@pytest.mark.parametrize("task", ["inpaint", "edit", "outpaint"])
@pytest.mark.parametrize("size", SIZES)
def test_centre_box_is_centred_frac_wide_and_never_the_whole_image(task, size):
    """inpaint / edit regenerate (outpaint keeps) a centred square whose side is the
    fraction of the image side (rounded, 1 .. size-1 pixels): never the whole image and
    never nothing, so there is always something known and something to generate."""
    for frac in FRACS:
        mask = masks.make_mask(task, size, frac=frac)[0, 0]
        box = mask if task == "outpaint" else ~mask
        assert box.any() and not box.all(), frac
        rows, columns = box.any(dim=1), box.any(dim=0)
        assert torch.equal(box, rows[:, None] & columns[None, :]), (frac, "not a box")
        (top, bottom), = runs(rows)
        (left, right), = runs(columns)
        span = expected_span(size, frac)
        assert bottom - top == right - left == span, frac
        assert (top, left) == ((size - span) // 2,) * 2, frac  # centred (an odd margin: one more below / right)


def test_mask_errors():
    with pytest.raises(ValueError, match="inpaint"):
        masks.make_mask("colorize", 16)
    for task in masks.TASKS:
        for frac in (0.0, 1.0, 1.5, -0.25, float("nan")):  # a fraction strictly between 0 and 1
            with pytest.raises(ValueError, match="fraction"):
                masks.make_mask(task, 16, frac=frac)
    with pytest.raises(ValueError, match="side"):
        masks.uncrop_mask(16, side="middle")
