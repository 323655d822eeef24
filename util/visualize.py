"""Image grids, PNG/GIF writing and image loading for the demos (PIL only).

Images are uint8 tensors (B, C, H, W) as returned by `FractalGen.generate`: C = 1 (grey,
written as PIL mode L), 2 (LA), 3 (RGB) or 4 (RGBA, with real transparency).
"""
import os

import numpy as np
import torch
from PIL import Image

from util.data import convert_mode, image_mode
from util.misc import UserInputError, replacing

GRID_PAD = 2        # pixels between tiles
GRID_PAD_VALUE = 255
HIDDEN_DARK, HIDDEN_LIGHT = 96, 160  # checkerboard shown where a pixel is unknown


def make_grid(images, nrow=None, pad=GRID_PAD, pad_value=GRID_PAD_VALUE):
    """uint8 (B, C, H, W) -> uint8 (C, rows*(H+pad)+pad, nrow*(W+pad)+pad), row-major,
    `nrow` tiles per row (default: all in one row); C from 1 to 4 (the padding of an RGBA
    grid is opaque)."""
    images = torch.as_tensor(images).detach().cpu()
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.dtype != torch.uint8 or images.ndim != 4 or not 1 <= images.shape[1] <= 4:
        raise ValueError(f"expected uint8 images (B, C, H, W) with C from 1 to 4, got {images.dtype} "
                         f"{tuple(images.shape)}")
    B, C, H, W = images.shape
    nrow = min(nrow or B, B)
    rows = -(-B // nrow)
    grid = torch.full((C, rows * (H + pad) + pad, nrow * (W + pad) + pad), pad_value, dtype=torch.uint8)
    for i in range(B):
        y, x = pad + (i // nrow) * (H + pad), pad + (i % nrow) * (W + pad)
        grid[:, y:y + H, x:x + W] = images[i]
    return grid


def to_pil(image, scale=1):
    """uint8 (C, H, W) -> PIL image of mode L, LA, RGB or RGBA, enlarged `scale` times with
    nearest neighbour so that tiny images stay crisp."""
    array = torch.as_tensor(image).detach().cpu().permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        array = array[:, :, 0]
    pil = Image.fromarray(np.ascontiguousarray(array))  # (H, W[, C]) uint8 -> L, LA, RGB or RGBA
    if scale != 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    return pil


def auto_scale(height, target=256):
    """Integer enlargement that brings a tile of `height` pixels near `target`."""
    return max(1, target // max(height, 1))


def save_grid(images, path, nrow=None, scale=None):
    """Write uint8 (B, 3, H, W) as one grid PNG; scale None enlarges small images. Returns path."""
    images = torch.as_tensor(images)
    grid = make_grid(images, nrow)
    scale = scale or auto_scale(images.shape[-2], target=64)
    with replacing(path) as tmp:
        to_pil(grid, scale).save(tmp, format=image_format(path))
    return path


def save_gif(frames, path, duration_ms=80, final_hold_ms=1500, scale=1):
    """Write uint8 (3, H, W) frames as a looping GIF to a path or a binary file object
    (e.g. io.BytesIO, to show it in a notebook); the last frame is held longer."""
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    pils = [to_pil(f, scale) for f in frames]
    durations = [duration_ms] * (len(pils) - 1) + [final_hold_ms]
    if not isinstance(path, (str, os.PathLike)):  # a file object
        pils[0].save(path, format="GIF", save_all=True, append_images=pils[1:], duration=durations, loop=0)
        return path
    with replacing(path) as tmp:
        pils[0].save(tmp, format="GIF", save_all=True, append_images=pils[1:], duration=durations, loop=0)
    return path


def show_known(images, known_mask):
    """Display version of a partly known image: unknown pixels become a grey checkerboard
    (opaque, for images with alpha). images uint8 (B, C, H, W); known_mask bool
    broadcastable to it -> uint8 (B, C, H, W)."""
    images = torch.as_tensor(images)
    known = torch.broadcast_to(torch.as_tensor(known_mask, device=images.device), images.shape)
    H, W = images.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    tile = max(1, H // 8)
    board = torch.where(((ys // tile + xs // tile) % 2) == 0, HIDDEN_DARK, HIDDEN_LIGHT).to(torch.uint8)
    board = board.to(images.device).expand_as(images).clone()
    if images.shape[-3] in (2, 4):  # LA, RGBA: the last channel is alpha
        board[..., -1, :, :] = 255
    return torch.where(known, images, board)


def open_image(path):
    """Read an image file fully -> PIL image; one-sentence UserInputError when it cannot be."""
    if os.path.isdir(path):
        raise UserInputError(f"input image {path!r} is a folder; pass an image file inside it")
    if not os.path.isfile(path):
        raise UserInputError(f"input image {path!r} does not exist; pass an existing image file")
    try:
        img = Image.open(path)
        img.load()
    except (OSError, Image.DecompressionBombError) as e:
        raise UserInputError(f"cannot read input image {path!r} ({e}); pass a PNG or JPEG file") from None
    return img


def load_image(path, size, channels=3):
    """Read an image file (or take an opened PIL image) -> uint8 (1, C, size, size) with C =
    `channels` (util.data.image_mode: grey, RGB, RGBA, ...): short side resized (bicubic) to
    `size`, then centre-cropped."""
    img = path if isinstance(path, Image.Image) else open_image(path)
    with img:
        img = img.convert("RGB") if channels == 3 else convert_mode(img, image_mode(channels, "an image"))
        scale = size / min(img.size)
        if img.size != (size, size):
            img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                             Image.BICUBIC)
            left, top = (img.width - size) // 2, (img.height - size) // 2
            img = img.crop((left, top, left + size, top + size))
        array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:  # L
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0)


def image_format(path):
    """PIL's format name for the file's extension ('.png' -> 'PNG'); UserInputError for one
    PIL cannot write."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise UserInputError(f"cannot write images to {os.fspath(path)!r}: unknown file type {ext or '(none)'}; "
                             f"end the name in .png (or .jpg, .gif)")
    return fmt
