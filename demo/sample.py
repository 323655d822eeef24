"""Sample from a FractalGen checkpoint, or complete a partly known image.

    # class-conditional samples with the official settings of that model
    python demo/sample.py --ckpt pretrained_models/fractalmar_in64 --labels 207 360 387 974 \
        --output samples.png --gif generation.gif
    # conditional pixel prediction (paper, Figure 4) on an image of your own
    python demo/sample.py --ckpt pretrained_models/fractalmar_in64 --task inpaint --input dog.png --labels 207
    python demo/sample.py --ckpt quickstart_out/train --task edit --input square.png --labels 0

--ckpt takes a checkpoint file, a folder holding checkpoint-last.pth (official or ours), or
the name of an official model (add --download to fetch it). The architecture comes from
--model, else from the checkpoint's 'args', else from the folder name.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python demo/sample.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import DEFAULT_SAMPLING, MODELS, CheckpointMismatchError, create_model  # noqa: E402
from util.checkpoint import load_checkpoint  # noqa: E402
from util.download import (CHECKPOINT_NAME, PRETRAINED_URLS, DownloadError, checkpoint_path,  # noqa: E402
                           download_pretrained)
from util.masks import TASKS, make_mask  # noqa: E402
from util.misc import UserInputError, autocast, one_line  # noqa: E402
from util.visualize import auto_scale, load_image, make_grid, save_gif, save_grid, show_known  # noqa: E402

# 'args' entries of a training checkpoint that shape the architecture (the rest -- dropout,
# learning rate, paths -- does not matter for sampling).
ARCH_ARGS = ("class_num", "num_conds", "guiding_pixel")
GENERIC_SAMPLING = dict(num_iter_list=None, cfg=1.0, cfg_schedule="linear", temperature=1.0, filter_threshold=1e-4)


# ---------------------------------------------------------------------- loading
def resolve_checkpoint(ckpt, download=False, root="pretrained_models"):
    """File, folder or official model name -> path of the checkpoint file."""
    if os.path.isdir(ckpt):
        ckpt = os.path.join(ckpt, CHECKPOINT_NAME)
    if os.path.isfile(ckpt):
        return ckpt
    if ckpt in PRETRAINED_URLS:
        path = checkpoint_path(ckpt, root)
        if os.path.isfile(path):
            return path
        if download:
            try:
                return download_pretrained(ckpt, root)
            except DownloadError as e:
                raise SystemExit(f"error: {e}") from None
        raise SystemExit(f"{path} is not there yet; run `python util/download.py --model {ckpt}` "
                         f"or add --download.")
    raise SystemExit(f"checkpoint {ckpt!r} not found; pass a checkpoint file, a folder with "
                     f"{CHECKPOINT_NAME}, or one of {', '.join(PRETRAINED_URLS)}.")


def read_checkpoint(path):
    """Load a checkpoint safely (weights_only, argparse.Namespace allowed: util.checkpoint).
    Returns (state_dict, args as a dict; {} when the file holds none)."""
    try:
        ckpt = load_checkpoint(path)
    except UserInputError as e:
        raise SystemExit(f"error: {one_line(e)}") from None
    args = ckpt.get("args") or {}
    return ckpt["model"], dict(vars(args) if isinstance(args, argparse.Namespace) else args)


def infer_model_name(path, args, model_name=None):
    """--model, else the checkpoint's args.model, else the folder name
    (pretrained_models/<name>/checkpoint-last.pth)."""
    name = model_name or args.get("model") or Path(path).resolve().parent.name
    if name not in MODELS:
        raise SystemExit(f"cannot tell the architecture of {path} (got {name!r}); pass --model with one "
                         f"of {', '.join(MODELS)}.")
    return name


def load_model(ckpt, model_name=None, device="cpu", download=False):
    """Build the model a checkpoint was trained as and load its weights (strict).
    Returns (model in eval mode on `device`, model name, checkpoint args dict)."""
    path = resolve_checkpoint(ckpt, download=download)
    state_dict, args = read_checkpoint(path)
    name = infer_model_name(path, args, model_name)
    kwargs = {k: args[k] for k in ARCH_ARGS if args.get(k) is not None}
    if "class_num" not in kwargs and "class_emb.weight" in state_dict:
        kwargs["class_num"] = state_dict["class_emb.weight"].shape[0]
    model = create_model(name, **kwargs)
    try:
        model.load_state_dict(state_dict, strict=True)
    except CheckpointMismatchError as e:
        raise SystemExit(f"{path} does not fit --model {name}: {e}") from None
    return model.to(device).eval(), name, args


def sampling_settings(model_name, **overrides):
    """Official defaults of `model_name` (models.DEFAULT_SAMPLING), with every override
    that is not None applied on top."""
    settings = dict(DEFAULT_SAMPLING.get(model_name, GENERIC_SAMPLING))
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sampling_precision(device, precision="auto"):
    """--precision: auto is bf16 autocast on CUDA (as in training), fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise SystemExit(f"--precision fp16 needs a CUDA device (got {device}); use bf16 or fp32.")
    return precision


# ---------------------------------------------------------------------- sampling
def run_task(model, labels, task="sample", image=None, frac=0.5, side="right", progress=None, **settings):
    """Sample `labels` (list of ints) unconditionally on pixels (task 'sample') or complete
    `image` (uint8 (1, 3, H, W)) under the mask of `task`.
    Returns (images uint8 (B, 3, H, W), shown input uint8 (1, 3, H, W) or None)."""
    if task == "sample":
        return model.generate(labels, progress=progress, **settings).cpu(), None
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose sample or one of {', '.join(TASKS)}")
    if image is None:
        raise ValueError(f"task {task!r} needs an input image")
    known_mask = make_mask(task, model.img_size, frac=frac, side=side)
    device = next(model.parameters()).device
    out = model.generate(labels, known=image.to(device), known_mask=known_mask.to(device),
                         progress=progress, **settings)
    return out.cpu(), show_known(image, known_mask)


def layout(images, shown_input, per_row):
    """Tiles and row length of the output grid: one row per label (`per_row` samples),
    with the masked input leading each row for conditional tasks."""
    if shown_input is None:
        return images, per_row
    rows = images.reshape(-1, per_row, *images.shape[1:])
    lead = shown_input.expand(rows.shape[0], 1, *images.shape[1:])
    return torch.cat([lead, rows], dim=1).flatten(0, 1), per_row + 1


def parse_ints(values):
    """['1,2', '3'] -> [1, 2, 3]"""
    return [int(v) for item in values for v in str(item).split(",") if v.strip()]


def get_args_parser():
    p = argparse.ArgumentParser(description="Sample from a FractalGen checkpoint (class-conditional, "
                                            "or inpaint/outpaint/uncrop/edit an image).")
    p.add_argument("--ckpt", required=True, help="checkpoint file, folder with checkpoint-last.pth, or an official model name")
    p.add_argument("--model", default=None, choices=list(MODELS), help="architecture (default: from the checkpoint)")
    p.add_argument("--download", action="store_true", help="fetch an official checkpoint named by --ckpt if missing")
    p.add_argument("--labels", nargs="+", default=["0"], help="class labels, e.g. 207 360 or 207,360")
    p.add_argument("--num_per_label", type=int, default=1, help="samples per label (one grid row per label)")
    p.add_argument("--task", default="sample", choices=["sample", *TASKS])
    p.add_argument("--input", default=None, help="image for inpaint/outpaint/uncrop/edit (resized and centre-cropped)")
    p.add_argument("--mask_frac", type=float, default=0.5, help="size of the unknown box / known centre / uncropped side")
    p.add_argument("--uncrop_side", default="right", choices=["left", "right", "top", "bottom"])
    # sampling options: unset ones take the model's official defaults (models.DEFAULT_SAMPLING)
    p.add_argument("--num_iter_list", default=None, help="iterations per generator level, e.g. 64,16")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--cfg_schedule", default=None, choices=["linear", "constant"])
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--filter_threshold", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks: faster MAR sampling after a slow first call; "
                        "floats differ from eager at rounding level, so seeded images may differ")
    p.add_argument("--fast", action="store_true",
                   help="fast sampler: static-shape steps compiled with torch.compile (the first run compiles; "
                        "the same distribution, other random draws than the official sampler)")
    p.add_argument("--output", default="samples.png", help="grid PNG to write")
    p.add_argument("--gif", default=None, help="also write the generation process as an animated GIF")
    p.add_argument("--scale", type=int, default=None, help="enlarge the PNG/GIF this many times (default: auto)")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = pick_device(args.device)
    if args.task != "sample" and args.input is None:
        raise SystemExit(f"--task {args.task} needs --input IMAGE (the picture to complete).")
    precision = sampling_precision(device, args.precision)
    model, name, _ = load_model(args.ckpt, args.model, device, download=args.download)
    if args.compile:
        model.compile_blocks()
    labels = [label for label in parse_ints(args.labels) for _ in range(args.num_per_label)]
    bad = [label for label in labels if not 0 <= label < model.class_num]
    if bad:
        raise SystemExit(f"labels {sorted(set(bad))} are outside [0, {model.class_num}) for this model.")
    num_iter = tuple(parse_ints([args.num_iter_list])) if args.num_iter_list else None
    settings = sampling_settings(name, num_iter_list=num_iter, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
                                 temperature=args.temperature, filter_threshold=args.filter_threshold)
    try:
        image = load_image(args.input, model.img_size) if args.input else None
    except UserInputError as e:
        raise SystemExit(f"error: {one_line(e)}") from None
    scale = args.scale or auto_scale(model.img_size, target=128)

    frames = []

    def record(canvas, step, total):  # one GIF frame per top-level step
        print(f"\rstep {step}/{total}", end="", file=sys.stderr, flush=True)
        if args.gif:
            shown = None if image is None else show_known(image, make_mask(args.task, model.img_size,
                                                                           args.mask_frac, args.uncrop_side))
            tiles, nrow = layout(canvas.cpu(), shown, args.num_per_label)
            frames.append(make_grid(tiles, nrow))

    print(f"{name}: {args.task} for labels {parse_ints(args.labels)} on {device} with {settings}", file=sys.stderr)
    torch.manual_seed(args.seed)
    start = time.time()
    with autocast(device, precision):
        images, shown = run_task(model, labels, args.task, image, args.mask_frac, args.uncrop_side,
                                 progress=record, fast=args.fast, **settings)
    print(f"\ngenerated {len(labels)} image(s) in {time.time() - start:.1f}s", file=sys.stderr)
    tiles, nrow = layout(images, shown, args.num_per_label)
    save_grid(tiles, args.output, nrow=nrow, scale=scale)
    print(f"wrote {args.output}")
    if args.gif:
        frames.append(make_grid(tiles, nrow))
        save_gif(frames, args.gif, scale=scale)
        print(f"wrote {args.gif}")


if __name__ == "__main__":
    main()
