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

Running it again reuses the dataset and the finished checkpoint (pass --fresh to retrain:
that deletes only what the quick start's training wrote in OUT/train). The sampling
settings used here are stored in the checkpoint, so demo/sample.py, the notebook and
models.load_model(...).generate() sample it the same way.
"""
import glob
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python demo/quickstart.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main_fractalgen  # noqa: E402
from demo.sample import StepBar  # noqa: E402
from models import DEFAULT_SAMPLING, load_model  # noqa: E402
from util import checkpoint as ckpt_util  # noqa: E402
from util import cli, toy_data  # noqa: E402
from util.checkpoint import CHECKPOINT_NAME, load_checkpoint  # noqa: E402
from util.misc import UserInputError, one_line  # noqa: E402
from util.progress import progress_bar  # noqa: E402
from util.masks import make_mask  # noqa: E402
from util.visualize import load_image, make_grid, save_gif, save_grid, show_known  # noqa: E402

REPO = str(Path(__file__).resolve().parents[1])
IMG_SIZE = 16  # the tiny models are built for 16x16 images
QUICKSTART_MODELS = ("fractalar_tiny", "fractalmar_tiny")
# what main_fractalgen.py writes in its output folder: --fresh deletes these and nothing else
TRAINING_OUTPUTS = ("checkpoint*.pth", "checkpoint*.pth.tmp*", "log.txt", "events.out.tfevents.*")


def get_args_parser():
    p = cli.ArgumentParser(description="Train and sample a tiny FractalGen on a toy dataset (CPU, minutes).")
    p.add_argument("--out", default="quickstart_out", help="everything goes here: data/, train/, PNGs, GIF")
    p.add_argument("--model", default="fractalar_tiny", choices=QUICKSTART_MODELS)
    p.add_argument("--num_classes", type=int, default=4, help=f"shapes to learn (1..{len(toy_data.CLASSES)})")
    p.add_argument("--num_train_per_class", type=int, default=400, help="training images per class")
    p.add_argument("--num_val_per_class", type=int, default=25, help="val images per class (bits/dim, editing)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs")
    p.add_argument("--warmup_epochs", type=int, default=1, help="linear lr warm-up epochs")
    p.add_argument("--batch_size", type=int, default=16, help="images per training step")
    p.add_argument("--blr", type=float, default=3e-2, help="base lr; lr = blr x batch_size / 256")
    p.add_argument("--samples_per_class", type=int, default=8, help="samples per row of samples.png")
    # the tiny models' DEFAULT_SAMPLING (both have temperature 2, cfg 2: a briefly trained model
    # spreads a little probability over wrong colours, which sharper logits and mild guidance
    # remove; compare --temperature 1 --cfg 1)
    p.add_argument("--temperature", type=float, default=DEFAULT_SAMPLING["fractalar_tiny"]["temperature"],
                   help="multiplies the logits (official convention): above 1 is sharper")
    p.add_argument("--cfg", type=float, default=DEFAULT_SAMPLING["fractalar_tiny"]["cfg"],
                   help="classifier-free guidance scale")
    p.add_argument("--device", default=None, help="cuda if available, else cpu, unless given")
    p.add_argument("--seed", type=int, default=0, help="seeds data, training and sampling")
    cli.add_threads_flag(p, default=1, help=cli.THREADS_HELP + ". The tiny model's ops are small: 2 threads were "
                     "only ~1.25x faster than 1 on an idle 2-core machine, and ~10x slower on a busy one")
    p.add_argument("--fresh", action="store_true",
                   help="delete the checkpoint, log and TensorBoard files of OUT/train and train from scratch")
    return p


def banner(text):
    print(f"\n=== {text} ===", flush=True)


def shown(path):
    """A path as the user would type it: relative to the current folder when inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def device_and_seed(args):
    """--device and --seed for main_fractalgen.py, where the user gave them."""
    return [*(["--device", args.device] if args.device else []), *(["--seed", args.seed] if args.seed else [])]


def train_args(args, data, train_dir):
    """The command line handed to main_fractalgen.py for training (the README shows it, with
    another --output_dir). Data loading stays in the process: the images are tiny."""
    return ["--model", args.model, "--data_path", shown(data), "--output_dir", shown(train_dir),
            "--resume", shown(train_dir), "--epochs", args.epochs, "--warmup_epochs", args.warmup_epochs,
            "--batch_size", args.batch_size, "--blr", args.blr, "--save_last_freq", max(1, args.epochs // 4),
            "--num_workers", 0, "--threads", args.threads, *device_and_seed(args)]


def val_examples(data, num_classes):
    """The first val image of each class -> uint8 (K, 3, 16, 16)."""
    images = []
    for name, _, _ in toy_data.CLASSES[:num_classes]:
        folder = os.path.join(data, "val", name)
        images.append(load_image(os.path.join(folder, sorted(os.listdir(folder))[0]), IMG_SIZE))
    return torch.cat(images)


def make_samples(model, num_classes, per_class, seed):
    """One row per class, with the model's sampling settings -> (images, the generation
    process as GIF frames)."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    steps = StepBar(frame=lambda canvas: make_grid(canvas, per_class))
    torch.manual_seed(seed)
    try:
        images = model.generate(labels, progress=steps).cpu()
    finally:
        steps.close()
    return images, steps.frames + [make_grid(images, per_class)]


def make_conditional(model, data, num_classes, seed, per_task=3):
    """Rows per class: original, masked input, `per_task` inpaintings (same label); masked
    input, `per_task` edits under the next class's label -> the tiles, row by row."""
    originals = val_examples(data, num_classes)
    device = next(model.parameters()).device
    mask = make_mask("inpaint", IMG_SIZE, frac=0.5)
    edit_mask = make_mask("edit", IMG_SIZE, frac=0.625)
    rows = []
    torch.manual_seed(seed)
    for c, image in enumerate(progress_bar(originals, desc="inpainting and editing", unit="class")):
        image = image.unsqueeze(0)
        same = model.generate([c] * per_task, known=image.to(device), known_mask=mask.to(device)).cpu()
        other = (c + 1) % num_classes
        edits = model.generate([other] * per_task, known=image.to(device), known_mask=edit_mask.to(device)).cpu()
        rows.append(torch.cat([image, show_known(image, mask), same, show_known(image, edit_mask), edits]))
    return torch.cat(rows)


def write_outputs(out, samples, frames, conditional, per_class, per_task=3):
    """samples.png, generation.gif and conditional.png, written only once all of them are
    made (an interrupted run leaves the previous run's files). Returns the three paths."""
    return (save_grid(samples, os.path.join(out, "samples.png"), nrow=per_class, scale=6),
            save_gif(frames, os.path.join(out, "generation.gif"), scale=6),
            save_grid(conditional, os.path.join(out, "conditional.png"), nrow=2 * per_task + 3, scale=6))


# ---------------------------------------------------------------------- OUT/train
def check_train_dir(train_dir, data, model, fresh):
    """OUT/train may only hold a quick start run (a tiny model trained on a folder named
    data): never resume into, or delete, a run of something else."""
    path = os.path.join(train_dir, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        return
    args = load_checkpoint(path).get("args")
    trained_on, trained = getattr(args, "data_path", None), getattr(args, "model", None)
    ours = trained_on is not None and (os.path.abspath(trained_on) == data or
                                       (os.path.basename(trained_on) == "data" and trained in QUICKSTART_MODELS))
    if not ours:
        raise UserInputError(f"{path} was not written by the quick start (it is a {trained} run on {trained_on}); "
                             f"pass another --out, or move that run away")
    if trained != model and not fresh:
        raise UserInputError(f"{path} holds a {trained} run; add --fresh to train --model {model} in its place, "
                             f"or pass another --out")


def remove_training_outputs(train_dir):
    """--fresh: delete the checkpoints, log and TensorBoard files main_fractalgen.py wrote in
    OUT/train, and nothing else (a file of yours there stays)."""
    for pattern in TRAINING_OUTPUTS:
        for path in glob.glob(os.path.join(glob.escape(train_dir), pattern)):
            if os.path.isfile(path):
                os.remove(path)


def store_sampling(train_dir, settings):
    """Record the sampling settings in the checkpoint (its 'sampling' entry), so that
    models.load_model, demo/sample.py and the notebook sample it as the quick start did."""
    ckpt_util.store_sampling(os.path.join(train_dir, CHECKPOINT_NAME), settings, {"by": "quick start"})


# ---------------------------------------------------------------------- hints
def command(*words):
    """One shell command line, each word quoted where needed, single spaces."""
    return " ".join(shlex.quote(str(w)) for w in words)


def given_options(args, drop=()):
    """The options the user gave (those differing from the defaults), as command-line words:
    a hint that reruns the quick start keeps --model, --out and the rest."""
    parser = get_args_parser()
    words = []
    for key, value in vars(args).items():
        if key in drop or value == parser.get_default(key):
            continue
        words += [f"--{key}"] if value is True else [f"--{key}", value]
    return words


def rerun_command(args):
    """The quick start command that continues this run (never with --fresh)."""
    return command("python", shown(os.path.join(REPO, "demo/quickstart.py")), *given_options(args, drop=("fresh",)))


def next_steps(args, out, data, train_dir):
    """The 'Next steps' hint lines: each command in one line, with the user's own paths."""
    ckpt, val_image = shown(train_dir), shown(os.path.join(data, "val", toy_data.CLASSES[0][0], "00000.png"))
    sample_py, quickstart_py, main_py, notebook = (shown(os.path.join(REPO, name)) for name in (
        "demo/sample.py", "demo/quickstart.py", "main_fractalgen.py", "demo/run_fractalgen.ipynb"))
    labels = list(range(args.num_classes))
    threads = ["--threads", args.threads]
    mar = command("python", quickstart_py, "--model", "fractalmar_tiny", "--out", shown(out) + "_mar")
    outpaint = (f"outpainting works best with a MAR model ({mar}): an AR model cannot see known pixels below or "
                f"right of the one it draws" if args.model.startswith("fractalar") else "")
    return [
        "# more samples (new ones: another --seed), and the generation as a GIF",
        command("python", sample_py, "--ckpt", ckpt, "--labels", *labels, "--num_per_label", 8,
                "--seed", args.seed + 1, *threads, "--output", shown(os.path.join(out, "more_samples.png")),
                "--gif", shown(os.path.join(out, "more_generation.gif"))),
        "# class-conditional editing of a val image: the centre box is redrawn as another class; what lies "
        "outside the box stays, so parts of the old shape may remain around the new one",
        command("python", sample_py, "--ckpt", ckpt, "--task", "edit", "--input", val_image,
                "--labels", min(1, args.num_classes - 1), *threads, "--output", shown(os.path.join(out, "edit.png"))),
        "# also --task inpaint, outpaint, uncrop" + (f"; {outpaint}" if outpaint else ""),
        "# the notebook, on this checkpoint",
        f"FRACTALGEN_CKPT={shlex.quote(ckpt)} FRACTALGEN_THREADS={args.threads} "
        + command("jupyter", "notebook", notebook),
        "# longer training, sharper shapes (retrains the checkpoint above)",
        command("python", quickstart_py, *given_options(args, drop=("epochs", "fresh")),
                "--epochs", 2 * args.epochs, "--fresh"),
        "# your own data: an ImageFolder with train/ and val/ (docs/your-own-data.md; 64x64 models need a GPU)",
        command("python", main_py, "--model", "fractalmar_in64", "--data_path", "DATA", "--output_dir",
                "output_dir/mydata", "--resume", "output_dir/mydata", "--batch_size", 64, "--epochs", 800,
                "--warmup_epochs", 40, "--blr", "5e-5"),
    ]


# ---------------------------------------------------------------------- main
class Interrupted(Exception):
    """Ctrl-C: the quick start stops; `where` says at which point."""

    def __init__(self, where):
        super().__init__(where)
        self.where = where


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except UserInputError as e:
        raise SystemExit(f"error: {one_line(e)}") from None
    except KeyboardInterrupt:
        report_interrupt(args, "stopped")
    except Interrupted as e:
        report_interrupt(args, e.where)


def report_interrupt(args, where):
    """After Ctrl-C: what is kept, and the command that continues (exit status 130)."""
    out = shown(os.path.abspath(args.out))
    kept = (f"samples.png, generation.gif and conditional.png in {out} are still those of the last complete run"
            if os.path.isfile(os.path.join(out, "samples.png")) else "no samples were written")
    print(f"\nquick start interrupted: {where}; {kept}. To continue, run: {rerun_command(args)}",
          file=sys.stderr, flush=True)
    raise SystemExit(130)


def run_main(argv):
    """main_fractalgen.main in this process, exactly as from the command line. Ctrl-C (which
    main_fractalgen turns into a checkpointed stop, or exit status 130) raises Interrupted."""
    argv = [str(a) for a in argv]
    print(command("python", shown(os.path.join(REPO, "main_fractalgen.py")), *argv), flush=True)
    try:
        result = main_fractalgen.main(main_fractalgen.get_args_parser().parse_args(argv))
    except SystemExit as e:
        if e.code == 130:
            raise Interrupted("stopped") from None
        raise
    if "stopped" in result:
        stop = result["stopped"]
        raise Interrupted(f"training stopped after step {stop['step']} of {stop['steps']} in epoch {stop['epoch']} "
                          f"({shown(stop['checkpoint'])} holds that point)")
    return result


def run(args):
    cli.set_threads(args.threads)
    start = time.time()
    out = os.path.abspath(args.out)
    data, train_dir = os.path.join(out, "data"), os.path.join(out, "train")
    names = toy_data.class_names(args.num_classes) if 1 <= args.num_classes <= len(toy_data.CLASSES) else []
    check_train_dir(train_dir, data, args.model, args.fresh)
    if not os.path.exists(out):
        os.makedirs(out)
        with open(os.path.join(out, ".gitignore"), "w") as f:  # a new OUT never shows up in `git status`
            f.write("# written by demo/quickstart.py: everything in this folder is generated\n*\n")

    banner(f"1/4 toy dataset: {args.num_classes} classes ({', '.join(names)})")
    try:
        toy_data.make_dataset(data, args.num_classes, args.num_train_per_class, args.num_val_per_class,
                              IMG_SIZE, args.seed)
    except ValueError as e:
        raise UserInputError(str(e)) from None
    print(f"{shown(data)}/train: {args.num_classes} x {args.num_train_per_class} images, "
          f"{shown(data)}/val: {args.num_classes} x {args.num_val_per_class}")

    banner(f"2/4 training {args.model} for {args.epochs} epochs (main_fractalgen.py)")
    if args.fresh:
        remove_training_outputs(train_dir)
    run_main(train_args(args, data, train_dir))

    banner("3/4 val bits/dim (main_fractalgen.py --evaluate_nll)")
    nll = run_main(["--model", args.model, "--data_path", shown(data), "--output_dir", shown(train_dir),
                    "--resume", shown(train_dir), "--evaluate_nll", "--nll_bsz", 100, "--num_workers", 0,
                    "--threads", args.threads, *device_and_seed(args)])["nll"]

    banner("4/4 sampling")
    settings = {**DEFAULT_SAMPLING[args.model], "cfg": args.cfg, "temperature": args.temperature}
    store_sampling(train_dir, settings)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(train_dir, device=device)
    print(f"sampling settings: {model.describe_sampling()}")
    images, frames = make_samples(model, args.num_classes, args.samples_per_class, args.seed)
    tiles = make_conditional(model, data, args.num_classes, args.seed)
    samples, gif, conditional = write_outputs(out, images, frames, tiles, args.samples_per_class)
    summary = {"val_bpd": nll["bpd"], "model": args.model, "epochs": args.epochs,
               "seconds": round(time.time() - start, 1), "classes": names, "sampling": model.sampling_config()}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    lines = [
        f"Done in {summary['seconds']:.0f}s. Val NLL: {nll['bpd']:.3f} bits/dim.",
        f"  samples          {shown(samples)}   (row k = class k: {', '.join(names)})",
        f"  generation GIF   {shown(gif)}",
        f"  conditional      {shown(conditional)}",
        "                   (per row: original | centre hidden | 3 inpaintings | box hidden | 3 edits as the next "
        "class;",
        "                   an edit redraws only the box, so parts of the old shape outside it remain)",
        f"  checkpoint       {shown(os.path.join(train_dir, CHECKPOINT_NAME))}",
        "",
        "Next steps:",
        *("  " + line for line in next_steps(args, out, data, train_dir)),
    ]
    print("\n" + "\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
