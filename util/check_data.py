"""Find every image that would stop a training run, before the run.

    python -m util.check_data DATA                 # e.g. DATA/train and DATA/val, recursively
    python -m util.check_data DATA/train --workers 32

Every file that torchvision's ImageFolder would load (its image extensions) is opened,
fully decoded and converted to RGB by the loader training uses (util.data.load_rgb), in
parallel worker processes. Each unreadable file is listed with the reason; the exit code
is 1 when there is any, 0 when every image reads, 2 for a bad folder (also a split that
mixes loose images with class folders). Each split is described first as training sees
it: its class folders, or images without class folders (one class, unconditional).

Training itself meets an unreadable image only when a DataLoader worker reaches it, which
can be hours into an epoch; this scan costs one full decode per image, spread over the cores.
"""
import contextlib
import multiprocessing
import os
import sys
import time

from torchvision.datasets.folder import IMG_EXTENSIONS

from util import cli
from util.data import describe_split, load_rgb
from util.misc import UserInputError, progress
from util.validation import positive_int

CHUNK = 64  # files handed to a worker at a time: few round trips, still an even spread


def image_files(folder):
    """Every file under `folder` (recursively, sorted) with an ImageFolder image extension."""
    if not os.path.isdir(folder):
        raise UserInputError(f"{folder} is not a folder; give the dataset folder (e.g. DATA or DATA/train)")
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(folder, followlinks=True)
                   for name in names if name.lower().endswith(IMG_EXTENSIONS))
    if not files:
        raise UserInputError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {folder}")
    return files


def describe_layout(folder):
    """What training will make of `folder`: one line per split (DATA/train, DATA/val, or
    the folder itself when it has neither), as training says it. A split that mixes loose
    images with class folders raises UserInputError."""
    splits = [os.path.join(folder, name) for name in ("train", "val") if os.path.isdir(os.path.join(folder, name))]
    return [describe_split(split) for split in splits or [folder]]


def check_image(path):
    """(path, None) when the image decodes, else (path, why)."""
    try:
        load_rgb(path)
    except Exception as e:  # noqa: BLE001 -- any failure is a finding (PIL raises many kinds)
        return path, str(e) if isinstance(e, UserInputError) else f"cannot read image {path} ({type(e).__name__}: {e})"
    return path, None


def scan(files, workers):
    """{path: why} for every unreadable file of `files`, decoded by `workers` processes."""
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(multiprocessing.Pool(workers))
            results = pool.imap_unordered(check_image, files, chunksize=CHUNK)
        else:
            results = map(check_image, files)
        return {path: why for path, why in progress(results, "checking images", total=len(files), unit="img")
                if why is not None}


def get_args_parser():
    parser = cli.ArgumentParser(description="List every image under a folder that cannot be decoded.")
    parser.add_argument("folder", help="dataset folder, searched recursively (e.g. DATA, DATA/train)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="decoding processes (default: one per CPU core)")
    return parser


def main(argv=None):
    """Returns the exit code: 0 every image reads, 1 some do not, 2 bad arguments."""
    args = get_args_parser().parse_args(argv)
    try:
        workers = positive_int("--workers", args.workers)
        files = image_files(args.folder)
        layout = describe_layout(args.folder)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in layout:
        print(line)
    start = time.perf_counter()
    bad = scan(files, min(workers, len(files)))
    for path in sorted(bad):
        print(bad[path])
    seconds = time.perf_counter() - start
    print(f"checked {len(files)} images under {args.folder} in {seconds:.1f} s with {min(workers, len(files))} "
          f"process(es): {len(bad)} unreadable" + ("; remove or replace them before training" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
