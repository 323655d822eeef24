"""Download the official FractalGen checkpoints.

    python util/download.py                          # all five into pretrained_models/
    python util/download.py --model fractalmar_in64  # just one

Each file lands in `pretrained_models/<name>/checkpoint-last.pth`. The download itself
(atomic `.part` file, resume with HTTP Range, one line when offline) lives with the model
zoo in `models.zoo`; this is its command line, with progress bars that write whole lines
when stderr is a log file (util.progress).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python util/download.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import zoo  # noqa: E402
from models.zoo import CHECKPOINT_NAME, PRETRAINED_URLS, DownloadError, checkpoint_path, direct_link  # noqa: E402,F401
from util import cli  # noqa: E402
from util.progress import progress_bar  # noqa: E402


def download_file(url, dest, **kwargs):
    """models.zoo.download_file with log-friendly progress bars."""
    kwargs.setdefault("progress_bar", progress_bar)
    return zoo.download_file(url, dest, **kwargs)


def download_pretrained(name, root="pretrained_models", **kwargs):
    """models.zoo.download_pretrained with log-friendly progress bars."""
    kwargs.setdefault("progress_bar", progress_bar)
    return zoo.download_pretrained(name, root, **kwargs)


def get_args_parser():
    parser = cli.ArgumentParser(description="Download the official FractalGen checkpoints.")
    parser.add_argument("--model", nargs="+", default=["all"], choices=["all", *PRETRAINED_URLS], metavar="MODEL",
                        help=f"checkpoint(s) to fetch: all (default) or any of {', '.join(PRETRAINED_URLS)}")
    parser.add_argument("--output_dir", default="pretrained_models",
                        help="files go to OUTPUT_DIR/<model>/checkpoint-last.pth")
    parser.add_argument("--retries", type=int, default=5, help="retries after a dropped connection")
    parser.add_argument("--overwrite", action="store_true", help="download again even if the file exists")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    names = list(PRETRAINED_URLS) if "all" in args.model else args.model
    try:
        for name in names:
            path = download_pretrained(name, args.output_dir, retries=args.retries, overwrite=args.overwrite)
            print(path)
    except DownloadError as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        raise SystemExit("interrupted; run the same command again to continue (a partial file resumes).")


if __name__ == "__main__":
    main()
