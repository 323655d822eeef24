"""Find every image that would stop a training run, before the run.

    python -m util.check_data DATA                 # e.g. DATA/train and DATA/val, recursively
    python -m util.check_data DATA/train --workers 32

Each split is described first as training sees it: its class folders, or images without
class folders (one class, unconditional). Every file that training would load
(util.data.image_files: ImageFolder's image extensions, symlinked folders followed) is
opened, fully decoded and converted to RGB by the function training uses
(util.data.read_rgb), in parallel worker processes. Listed:
each unreadable file (damaged, or a decompression bomb) and each symlink loop, with the
reason, as training would stop on it; then how many images of each other mode were
converted, and how (16-bit grey is scaled to 8 bits, alpha dropped, ...), as training
converts them. The exit code is 1 when a file is unreadable or a folder loops, 0 when
every image reads, 2 for a bad folder (also a split that mixes loose images with class
folders).

Training itself meets an unreadable image only when a DataLoader worker reaches it, which
can be hours into an epoch; this scan costs one full decode per image, spread over the cores.
"""
import collections
import contextlib
import multiprocessing
import os
import sys
import time

from torchvision.datasets.folder import IMG_EXTENSIONS

from util import cli
from util.data import describe_split, read_rgb
from util.data import image_files as walk_image_files
from util.misc import UserInputError, progress
from util.validation import usable_cpus, worker_count

CHUNK = 64  # files handed to a worker at a time: few round trips, still an even spread


def image_files(folder, loops=None):
    """Every image file under `folder` that training would read (util.data.image_files);
    symlink loops are appended to `loops` (a list) and skipped."""
    if not os.path.isdir(folder):
        raise UserInputError(f"{folder} is not a folder; give the dataset folder (e.g. DATA or DATA/train)")
    files = walk_image_files(folder, loops=loops)
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
    """(path, None, note) when the image decodes (note: how it was converted, or None),
    else (path, why, None)."""
    try:
        return path, None, read_rgb(path)[1]
    except Exception as e:  # noqa: BLE001 -- any failure is a finding (PIL raises many kinds)
        why = str(e) if isinstance(e, UserInputError) else f"cannot read image {path} ({type(e).__name__}: {e})"
        return path, why, None


def scan(files, workers):
    """({path: why} for every unreadable file of `files`, {note: [paths]} for the converted
    ones), decoded by `workers` processes."""
    bad, converted = {}, collections.defaultdict(list)
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(multiprocessing.Pool(workers))
            results = pool.imap_unordered(check_image, files, chunksize=CHUNK)
        else:
            results = map(check_image, files)
        for path, why, note in progress(results, "checking images", total=len(files), unit="img"):
            if why is not None:
                bad[path] = why
            elif note is not None:
                converted[note].append(path)
    return bad, converted


def get_args_parser():
    parser = cli.ArgumentParser(description="List every image under a folder that cannot be decoded.")
    parser.add_argument("folder", help="dataset folder, searched recursively (e.g. DATA, DATA/train)")
    parser.add_argument("--workers", type=int, default=usable_cpus(),
                        help="decoding processes (default: one per CPU core)")
    return parser


def main(argv=None):
    """Returns the exit code: 0 every image reads, 1 some do not, 2 bad arguments."""
    args = get_args_parser().parse_args(argv)
    loops = []
    try:
        workers = worker_count("--workers", args.workers, minimum=1)
        files = image_files(args.folder, loops)
        layout = describe_layout(args.folder)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in layout:
        print(line)
    start = time.perf_counter()
    bad, converted = scan(files, min(workers, len(files)))
    for problem in loops:
        print(problem)
    for path in sorted(bad):
        print(bad[path])
    for note, paths in sorted(converted.items()):
        print(f"converted as training does: {len(paths)} image(s) of {note}, e.g. {min(paths)}")
    seconds = time.perf_counter() - start
    problems = [f"{len(bad)} unreadable"] + ([f"{len(loops)} symlink loop(s)"] if loops else [])
    print(f"checked {len(files)} images under {args.folder} in {seconds:.1f} s with {min(workers, len(files))} "
          f"process(es): {', '.join(problems)}, {sum(map(len, converted.values()))} converted"
          + ("; remove or replace them before training" if bad or loops else ""))
    return 1 if bad or loops else 0


if __name__ == "__main__":
    sys.exit(main())
