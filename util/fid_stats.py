"""Write FID reference statistics (`mu`, `sigma` of Inception pool features) for a folder
of real images, so that generated images can be scored against your own dataset.

    python -m util.fid_stats --images DATA/train --out fid_stats/mydata_in64_stats.npz --img_size 64

Images are searched recursively (an ImageFolder tree works as it is) and centre-cropped to
--img_size the way training data is (ADM crop), which is what generated images look like.
Inception sees them as util.fid.inception_rgb shows generated images: grey copied to R, G
and B, transparent images (RGBA, LA) composited over white.
Then train or evaluate with `--fid_stats_path fid_stats/mydata_in64_stats.npz`.
"""
import sys

from util import cli, fid, validation
from util.misc import UserInputError, one_line


def get_args_parser():
    parser = cli.ArgumentParser(description="Write FID reference statistics for a folder of images.")
    parser.add_argument("--images", required=True, help="folder of real images (searched recursively)")
    parser.add_argument("--out", required=True, help="output .npz with arrays mu and sigma")
    parser.add_argument("--img_size", type=int, default=None,
                        help="ADM centre-crop every image to this size first (use your training --img_size)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=4)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N; default: cuda when available, else cpu")
    parser.add_argument("--inception_weights", default=None,
                        help="local Inception weights file (default: torch-fidelity downloads them)")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        # every flag and the Inception weights are checked before any image is read
        device = validation.check_device(args.device)
        validation.positive_int("--batch_size", args.batch_size)
        validation.worker_count("--num_workers", args.num_workers)
        if args.img_size is not None:
            validation.positive_int("--img_size", args.img_size)
        inception = fid.build_inception(device, args.inception_weights)
        files = fid.list_images(args.images)
        print(f"computing Inception statistics of {len(files)} images in {args.images} on {device}", flush=True)
        features = fid.extract_features(files, inception, device, args.batch_size, args.img_size, args.num_workers)
        mu, sigma = fid.mean_and_cov(features[fid.FID_FEATURE])
        try:
            fid.save_stats(args.out, mu, sigma)
        except OSError as e:
            raise UserInputError(f"cannot write {args.out} ({e.strerror or e}); pick a writable --out") from None
    except UserInputError as e:
        sys.exit(f"error: {one_line(e)}")
    print(f"wrote {args.out} (mu {mu.shape}, sigma {sigma.shape}, {len(files)} images)")
    return args.out


if __name__ == "__main__":
    main()
