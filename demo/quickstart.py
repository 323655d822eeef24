"""Quickstart: train a tiny fractal model on a toy dataset on your laptop's CPU.

    python demo/quickstart.py                 # a few minutes on a laptop CPU, no downloads

1. writes a procedurally drawn ImageFolder dataset (coloured shapes, one class per shape)
   to OUT/data,
2. trains a tiny FractalGen on it with the real training code (main_fractalgen.py),
   checkpoints in OUT/train,
3. evaluates the val set's bits/dim (main_fractalgen.py --evaluate_nll),
4. writes class-conditional samples (OUT/samples.png, one row per class), the generation
   process (OUT/generation.gif) and conditional pixel prediction (OUT/conditional.png:
   inpainting and class-conditional editing of val images).

Running it again reuses the dataset and the finished checkpoint (pass --fresh to retrain).
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python demo/quickstart.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main_fractalgen  # noqa: E402
from demo.sample import load_model  # noqa: E402
from util import toy_data  # noqa: E402
from util.masks import make_mask  # noqa: E402
from util.visualize import load_image, make_grid, save_gif, save_grid, show_known  # noqa: E402

IMG_SIZE = 16  # the tiny models are built for 16x16 images


def get_args_parser():
    p = argparse.ArgumentParser(description="Train and sample a tiny FractalGen on a toy dataset (CPU, minutes).")
    p.add_argument("--out", default="quickstart_out", help="everything goes here: data/, train/, PNGs, GIF")
    p.add_argument("--model", default="fractalar_tiny", choices=["fractalar_tiny", "fractalmar_tiny"])
    p.add_argument("--num_classes", type=int, default=4, help=f"shapes to learn (1..{len(toy_data.CLASSES)})")
    p.add_argument("--num_train_per_class", type=int, default=400)
    p.add_argument("--num_val_per_class", type=int, default=25)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--warmup_epochs", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--blr", type=float, default=3e-2, help="base lr; lr = blr x batch_size / 256")
    p.add_argument("--samples_per_class", type=int, default=8)
    # A tiny, briefly trained model spreads a little probability over wrong colours; sharper
    # sampling and mild guidance clean that up (check: --temperature 1 --cfg 1).
    p.add_argument("--temperature", type=float, default=2.0,
                   help="multiplies the logits (official convention): above 1 is sharper")
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance scale")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch. The tiny model's ops are small: 2 threads were only "
                        "~1.25x faster than 1 on an idle 2-core machine, and ~10x slower on a busy one")
    p.add_argument("--fresh", action="store_true", help="delete OUT/train and train from scratch")
    return p


def banner(text):
    print(f"\n=== {text} ===", flush=True)


def train_args(args, data, train_dir):
    """The command line handed to main_fractalgen.py for training."""
    return ["--model", args.model, "--img_size", IMG_SIZE, "--data_path", data, "--output_dir", train_dir,
            "--resume", train_dir, "--epochs", args.epochs, "--warmup_epochs", args.warmup_epochs,
            "--batch_size", args.batch_size, "--blr", args.blr, "--save_last_freq", max(1, args.epochs // 4),
            "--num_workers", 0, "--seed", args.seed, *(["--device", args.device] if args.device else [])]


def run_main(argv):
    """main_fractalgen.main in this process, exactly as from the command line."""
    argv = [str(a) for a in argv]
    print("python main_fractalgen.py " + " ".join(argv), flush=True)
    return main_fractalgen.main(main_fractalgen.get_args_parser().parse_args(argv))


def val_examples(data, num_classes):
    """The first val image of each class -> uint8 (K, 3, 16, 16)."""
    images = []
    for name, _, _ in toy_data.CLASSES[:num_classes]:
        folder = os.path.join(data, "val", name)
        images.append(load_image(os.path.join(folder, sorted(os.listdir(folder))[0]), IMG_SIZE))
    return torch.cat(images)


def write_samples(model, args, out):
    """One row per class; also a GIF of the generation process. Returns the two paths."""
    labels = torch.arange(args.num_classes).repeat_interleave(args.samples_per_class)
    frames = []
    torch.manual_seed(args.seed)
    images = model.generate(labels, cfg=args.cfg, temperature=args.temperature,
                            progress=lambda canvas, step, total: frames.append(
                                make_grid(canvas.cpu(), args.samples_per_class)))
    png = save_grid(images.cpu(), os.path.join(out, "samples.png"), nrow=args.samples_per_class, scale=6)
    frames.append(make_grid(images.cpu(), args.samples_per_class))
    gif = save_gif(frames, os.path.join(out, "generation.gif"), scale=6)
    return png, gif


def write_conditional(model, args, data, out, per_task=3):
    """Rows per class: original, masked input, `per_task` inpaintings (same label); masked
    input, `per_task` edits under the next class's label. Returns the path."""
    originals = val_examples(data, args.num_classes)
    device = next(model.parameters()).device
    mask = make_mask("inpaint", IMG_SIZE, frac=0.5)
    edit_mask = make_mask("edit", IMG_SIZE, frac=0.625)
    rows = []
    torch.manual_seed(args.seed)
    for c, image in enumerate(originals):
        image = image.unsqueeze(0)
        same = model.generate([c] * per_task, cfg=args.cfg, temperature=args.temperature,
                              known=image.to(device), known_mask=mask.to(device)).cpu()
        other = (c + 1) % args.num_classes
        edits = model.generate([other] * per_task, cfg=args.cfg, temperature=args.temperature,
                               known=image.to(device), known_mask=edit_mask.to(device)).cpu()
        rows.append(torch.cat([image, show_known(image, mask), same, show_known(image, edit_mask), edits]))
    return save_grid(torch.cat(rows), os.path.join(out, "conditional.png"), nrow=2 * per_task + 3, scale=6)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    out = os.path.abspath(args.out)
    data, train_dir = os.path.join(out, "data"), os.path.join(out, "train")
    names = toy_data.class_names(args.num_classes) if 1 <= args.num_classes <= len(toy_data.CLASSES) else []

    banner(f"1/4 toy dataset: {args.num_classes} classes ({', '.join(names)})")
    try:
        toy_data.make_dataset(data, args.num_classes, args.num_train_per_class, args.num_val_per_class,
                              IMG_SIZE, args.seed)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"{data}/train: {args.num_classes} x {args.num_train_per_class} images, "
          f"{data}/val: {args.num_classes} x {args.num_val_per_class}")

    banner(f"2/4 training {args.model} for {args.epochs} epochs (main_fractalgen.py)")
    if args.fresh:
        shutil.rmtree(train_dir, ignore_errors=True)
    run_main(train_args(args, data, train_dir))

    banner("3/4 val bits/dim (main_fractalgen.py --evaluate_nll)")
    nll = run_main(["--model", args.model, "--data_path", data, "--output_dir", train_dir, "--resume", train_dir,
                    "--evaluate_nll", "--nll_bsz", 100, "--num_workers", 0, "--seed", args.seed,
                    *(["--device", args.device] if args.device else [])])["nll"]

    banner("4/4 sampling")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _, _ = load_model(train_dir, device=device)
    samples, gif = write_samples(model, args, out)
    conditional = write_conditional(model, args, data, out)
    summary = {"val_bpd": nll["bpd"], "model": args.model, "epochs": args.epochs,
               "seconds": round(time.time() - start, 1), "classes": names}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    print(f"""
Done in {summary['seconds']:.0f}s. Val NLL: {nll['bpd']:.3f} bits/dim.
  samples          {samples}   (row k = class k: {', '.join(names)})
  generation GIF   {gif}
  conditional      {conditional}
                   (per row: original | centre hidden | 3 inpaintings | box hidden | 3 edits as the next class)
  checkpoint       {os.path.join(train_dir, 'checkpoint-last.pth')}

Next steps:
  python demo/sample.py --ckpt {train_dir} --labels {' '.join(map(str, range(args.num_classes)))} --num_per_label 8 \
      --temperature {args.temperature} --cfg {args.cfg} --gif gen.gif          # more samples, with a GIF
  python demo/sample.py --ckpt {train_dir} --task edit --input {os.path.join(data, 'val', toy_data.CLASSES[0][0], '00000.png')} \
      --labels {min(1, args.num_classes - 1)} --temperature {args.temperature} --cfg {args.cfg}    # (also inpaint, outpaint, uncrop)
  python demo/quickstart.py --epochs {2 * args.epochs} --fresh      # longer training, sharper shapes
  Your own data: an ImageFolder with train/ and val/, then e.g.
  python main_fractalgen.py --model fractalmar_in64 --img_size 64 --data_path DATA --output_dir OUT \\
      --batch_size 64 --epochs 800 --warmup_epochs 40 --blr 5e-5   (on GPUs: see the README)""")
    return summary


if __name__ == "__main__":
    main()
