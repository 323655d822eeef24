"""Known-pixel masks for conditional pixel prediction (paper, Figure 4).

Every builder returns a bool tensor of shape (1, 1, H, W): True where the pixel is given
(kept exactly), False where the model generates it. That broadcasts to the (B, 3, H, W)
`known_mask` of `FractalGen.generate(labels, known=..., known_mask=...)`.

    inpaint   the centre box is unknown                 (fill a hole)
    outpaint  a border frame is unknown                 (extend the image outwards)
    uncrop    one side (default: the right half) is unknown
    edit      a centre box is regenerated, usually under a *different* class label

Edges are snapped to whole pixels; `frac` arguments are fractions of the image side.
"""
import torch

TASKS = ("inpaint", "outpaint", "uncrop", "edit")
SIDES = ("left", "right", "top", "bottom")


def _check(size, frac, name):
    if size < 2:
        raise ValueError(f"mask size must be at least 2 pixels, got {size}")
    if not 0 < frac < 1:
        raise ValueError(f"{name} must be a fraction strictly between 0 and 1, got {frac}")


def _centre_box(size, frac):
    """(start, stop) of a centred span covering about `frac` of `size` (at least one pixel,
    never the whole side)."""
    span = min(max(1, round(size * frac)), size - 1)
    start = (size - span) // 2
    return start, start + span


def inpaint_mask(size, frac=0.5):
    """Centre box of side ~frac*size unknown, the rest known."""
    _check(size, frac, "frac")
    a, b = _centre_box(size, frac)
    known = torch.ones(1, 1, size, size, dtype=torch.bool)
    known[..., a:b, a:b] = False
    return known


def outpaint_mask(size, frac=0.5):
    """Centre box of side ~frac*size known; the frame around it unknown."""
    return ~inpaint_mask(size, frac)


def uncrop_mask(size, frac=0.5, side="right"):
    """The `frac` of the image on `side` unknown (default: the right half)."""
    _check(size, frac, "frac")
    if side not in SIDES:
        raise ValueError(f"side must be one of {', '.join(SIDES)}, got {side!r}")
    n = min(max(1, round(size * frac)), size - 1)
    known = torch.ones(1, 1, size, size, dtype=torch.bool)
    if side == "right":
        known[..., :, size - n:] = False
    elif side == "left":
        known[..., :, :n] = False
    elif side == "bottom":
        known[..., size - n:, :] = False
    else:
        known[..., :n, :] = False
    return known


def edit_mask(size, frac=0.5):
    """The region that class-conditional editing regenerates: a centre box, like
    inpainting; the task differs in the label handed to generate (the new class)."""
    return inpaint_mask(size, frac)


def make_mask(task, size, frac=0.5, side="right"):
    """Mask for one of TASKS -> bool (1, 1, size, size), True = known."""
    if task == "inpaint":
        return inpaint_mask(size, frac)
    if task == "outpaint":
        return outpaint_mask(size, frac)
    if task == "uncrop":
        return uncrop_mask(size, frac, side)
    if task == "edit":
        return edit_mask(size, frac)
    raise ValueError(f"unknown conditional task {task!r}; choose one of {', '.join(TASKS)}")
