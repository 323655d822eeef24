"""Sample from a FractalGen checkpoint, or complete a partly known image.

    # class-conditional samples with the sampling settings of that checkpoint
    python demo/sample.py --ckpt pretrained_models/fractalmar_in64 --labels 207 360 387 974 \
        --output outputs/samples.png --gif outputs/generation.gif
    # conditional pixel prediction (paper, Figure 4) on an image of your own
    python demo/sample.py --ckpt pretrained_models/fractalmar_in64 --task inpaint --input dog.png --labels 207
    python demo/sample.py --ckpt quickstart_out/train --task edit --input square.png --labels 0

--ckpt takes a checkpoint file, a folder holding checkpoint-last.pth (official or ours),
the name of an official model (add --download to fetch it), a Hub folder (config.json +
model.safetensors, docs/sharing.md) or a Hub id hf-hub:USER/NAME; models.load_model builds
the model from the checkpoint alone (the configuration record it stores; official files name
their model). Sampling options left unset take the settings stored with the checkpoint (a
sweep's, the quick start's), else for a checkpoint you trained the training run's flags or
neutral ones, else the model's DEFAULT_SAMPLING (models.sampling); the second line printed
says which. Every flag is checked before the checkpoint is read; a bad one stops with one
line and nothing written.
"""
import math
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python demo/sample.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import load_model  # noqa: E402
from models.loading import resolve_checkpoint  # noqa: E402
from models.zoo import DownloadError  # noqa: E402
from util import cli  # noqa: E402
from util.data import image_mode  # noqa: E402
from util.masks import TASKS, make_mask  # noqa: E402
from util.misc import UserInputError, autocast, one_line  # noqa: E402
from util.progress import progress_bar  # noqa: E402
from util.validation import (FAST_HELP, FAST_SAMPLERS, check_device, check_model, check_sampling_args,  # noqa: E402
                             fast_sampler, parse_num_iter_list, positive_int)
from util.visualize import (auto_scale, image_format, load_image, make_grid, open_image, save_gif,  # noqa: E402
                            save_grid, show_known)


# ---------------------------------------------------------------------- checks
def sampling_precision(device, precision="auto"):
    """--precision: auto is bf16 autocast on CUDA (as in training), fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserInputError(f"--precision fp16 needs a CUDA device (got {device}); use bf16 or fp32")
    return precision


def parse_labels(values):
    """['1,2', '3'] -> [1, 2, 3]; UserInputError for anything but integers."""
    try:
        labels = [int(v) for item in values for v in str(item).split(",") if v.strip()]
    except ValueError:
        raise UserInputError(f"--labels {' '.join(map(str, values))!r} must be integer class ids, "
                             f"e.g. --labels 207 360 (or 207,360)") from None
    if not labels:
        raise UserInputError("--labels is empty; give at least one class id, e.g. --labels 0")
    return labels


def check_flags(args):
    """Every check that needs no model, before the checkpoint is read. Returns the parsed
    (labels, num_iter_list, device)."""
    labels = parse_labels(args.labels)
    positive_int("--num_per_label", args.num_per_label)
    if not (math.isfinite(args.mask_frac) and 0 < args.mask_frac < 1):
        raise UserInputError(f"--mask_frac must be a fraction strictly between 0 and 1 (of the image side), "
                             f"got {args.mask_frac}")
    num_iter_list = parse_num_iter_list(args.num_iter_list)
    check_sampling_args(args.temperature, args.cfg, args.filter_threshold)
    if args.model is not None:
        check_model(args.model)
    device = check_device(args.device)
    if args.scale is not None:
        positive_int("--scale", args.scale)
    if args.task != "sample" and args.input is None:
        raise UserInputError(f"--task {args.task} needs --input IMAGE (the picture to complete)")
    image_format(args.output)
    if args.gif is not None and image_format(args.gif) != "GIF":
        raise UserInputError(f"--gif {args.gif} must end in .gif")
    return labels, num_iter_list, device


def check_against_model(model, labels, num_iter_list):
    image_mode(model.in_channels, "this model")  # the output is a PNG: 1 to 4 channels
    bad = sorted({label for label in labels if not 0 <= label < model.class_num})
    if bad:
        raise UserInputError(f"labels {bad} are outside [0, {model.class_num}) for this model; pass class ids "
                             f"below {model.class_num}")
    levels = model.num_fractal_levels - 1
    if num_iter_list is not None and len(num_iter_list) != levels:
        raise UserInputError(f"--num_iter_list {','.join(map(str, num_iter_list))} has {len(num_iter_list)} "
                             f"entries but {model.model_name} has {levels} generator levels; give one per level, "
                             f"e.g. {','.join(map(str, model.default_num_iter_list()))}")


# ---------------------------------------------------------------------- sampling
def run_task(model, labels, task="sample", image=None, frac=0.5, side="right", progress=None, **settings):
    """Sample `labels` (list of ints) unconditionally on pixels (task 'sample') or complete
    `image` (uint8 (1, C, H, W), C = model.in_channels) under the mask of `task`.
    Returns (images uint8 (B, C, H, W), shown input uint8 (1, C, H, W) or None)."""
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


def get_args_parser():
    p = cli.ArgumentParser(description="Sample from a FractalGen checkpoint (class-conditional, "
                                       "or inpaint/outpaint/uncrop/edit an image).")
    p.add_argument("--ckpt", required=True,
                   help="checkpoint file, folder with checkpoint-last.pth, an official model name, a Hub folder "
                        "(config.json + model.safetensors) or a Hub id hf-hub:USER/NAME")
    p.add_argument("--model", default=None,
                   help="architecture: a model name or a JSON configuration file, for a checkpoint that does not "
                        "say (default: the checkpoint's own configuration, else its args or folder name)")
    p.add_argument("--download", action="store_true", help="fetch an official checkpoint named by --ckpt if missing")
    p.add_argument("--no_ema", action="store_true",
                   help="the raw weights, even when the checkpoint holds EMA weights (trained with --ema_rate), "
                        "which are used by default")
    p.add_argument("--labels", nargs="+", default=["0"], help="class labels, e.g. 207 360 or 207,360")
    p.add_argument("--num_per_label", type=int, default=1, help="samples per label (one grid row per label)")
    p.add_argument("--task", default="sample", choices=["sample", *TASKS])
    p.add_argument("--input", default=None, help="image for inpaint/outpaint/uncrop/edit (resized and centre-cropped)")
    p.add_argument("--mask_frac", type=float, default=0.5, help="size of the unknown box / known centre / uncropped side")
    p.add_argument("--uncrop_side", default="right", choices=["left", "right", "top", "bottom"])
    # sampling options: unset ones take the checkpoint's (FractalGen.sampling_config, models.sampling)
    p.add_argument("--num_iter_list", default=None, help="iterations per generator level, e.g. 64,16")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--cfg_schedule", default=None, choices=["linear", "constant"])
    p.add_argument("--temperature", type=float, default=None,
                   help="multiplies the logits (official convention): above 1 is sharper")
    p.add_argument("--filter_threshold", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    cli.add_threads_flag(p)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks: faster MAR sampling after a slow first call; "
                        "floats differ from eager at rounding level, so seeded images may differ")
    p.add_argument("--fast", nargs="?", const="compiled", default="off", choices=list(FAST_SAMPLERS),
                   help="fast sampler (the same distribution, other random draws than the official sampler; the "
                        "first call compiles). --fast alone means compiled. " + FAST_HELP)
    p.add_argument("--output", default="outputs/samples.png", help="grid PNG to write (outputs/ is git-ignored)")
    p.add_argument("--gif", default=None, help="also write the generation process as an animated GIF, e.g. "
                                               "outputs/generation.gif")
    p.add_argument("--scale", type=int, default=None, help="enlarge the PNG/GIF this many times (default: auto)")
    return p


class StepBar:
    """The `progress` callback of generate(): a progress bar over the top-level steps (whole
    lines when stderr is a file) and, with --gif, one frame per step."""

    def __init__(self, frame=None):
        self.frame, self.frames, self.bar = frame, [], None

    def __call__(self, canvas, step, total):
        if self.bar is None:
            self.bar = progress_bar(total=total, desc="sampling", unit="step")
        self.bar.update(step - self.bar.n)
        if self.frame is not None:
            self.frames.append(self.frame(canvas.cpu()))

    def close(self):
        if self.bar is not None:
            self.bar.close()


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except (UserInputError, DownloadError) as e:
        raise SystemExit(f"error: {one_line(e)}") from None
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback from wherever sampling was
        print(f"\ninterrupted (Ctrl-C); {args.output} is written only when sampling completes", file=sys.stderr)
        raise SystemExit(130) from None


def run(args):
    labels, num_iter_list, device = check_flags(args)
    cli.set_threads(args.threads)
    precision = sampling_precision(device, args.precision)
    picture = open_image(args.input) if args.input else None
    path = resolve_checkpoint(args.ckpt, download=args.download, progress_bar=progress_bar)
    model = load_model(path, args.model, device, ema=not args.no_ema)
    check_against_model(model, labels, num_iter_list)
    if args.compile:
        model.compile_blocks()
    labels = [label for label in labels for _ in range(args.num_per_label)]
    image = load_image(picture, model.img_size, model.in_channels) if picture is not None else None
    shown = None if image is None else show_known(image, make_mask(args.task, model.img_size, args.mask_frac,
                                                                   args.uncrop_side))
    scale = args.scale or auto_scale(model.img_size, target=128)
    steps = StepBar(frame=(lambda canvas: make_grid(*layout(canvas, shown, args.num_per_label))) if args.gif else None)

    given = dict(num_iter_list=num_iter_list, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
                 temperature=args.temperature, filter_threshold=args.filter_threshold)
    print(f"{model.model_name} ({model.weights} weights): {args.task} for labels {parse_labels(args.labels)} on "
          f"{device}\nsampling settings: {model.describe_sampling(**given)}", file=sys.stderr)
    note = model.sampling_note(**given)
    if note:
        print(note, file=sys.stderr)
    fast = fast_sampler(args.fast)
    if fast and args.task != "sample":
        print(f"--fast does not apply to --task {args.task}: conditional generation takes the exact sampler",
              file=sys.stderr)
    elif fast:
        print(cli.fast_notice(fast, model), file=sys.stderr)
    torch.manual_seed(args.seed)
    start = time.time()
    try:
        with autocast(device, precision):
            images, shown = run_task(model, labels, args.task, image, args.mask_frac, args.uncrop_side,
                                     progress=steps, fast=fast, **given)
    finally:
        steps.close()
    print(f"generated {len(labels)} image(s) in {time.time() - start:.1f}s", file=sys.stderr)
    tiles, nrow = layout(images, shown, args.num_per_label)
    save_grid(tiles, args.output, nrow=nrow, scale=scale)
    print(f"wrote {args.output}")
    if args.gif:
        steps.frames.append(make_grid(tiles, nrow))
        save_gif(steps.frames, args.gif, scale=scale)
        print(f"wrote {args.gif}")


if __name__ == "__main__":
    main()
