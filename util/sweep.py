"""Find the sampling settings that suit a checkpoint: a cfg x temperature (x num_iter_list)
sweep scored by FID, the best row marked, and the winner stored in the checkpoint on request.

    python -m util.sweep --resume OUT --data_path DATA --cfg 1,2,3,4 --temperature 0.9,1.0,1.1 \\
        --num_images 1000 --store
    torchrun --nproc_per_node=8 -m util.sweep --resume OUT --fid_stats_path FILE.npz --cfg 4,6,8 ...

Each setting generates --num_images class-balanced images with --evaluate_gen's own code
(engine_fractalgen.evaluate_gen: the generation and the Inception work split over the
processes, one PNG folder per setting) and scores them with FID (plus Inception Score;
precision/recall with --prc_ref_dir) against --fid_stats_path, or against the statistics of
--data_path's training images, computed once and cached beside the checkpoint. Every
setting draws from the same seeds, so the settings differ, not the luck of the draw.

Written to --output_dir (default: a `sweep` folder beside the checkpoint): sweep.json (each
setting's numbers, rewritten atomically as each finishes: rerun the same command after an
interruption and the finished settings are skipped), table.txt, contact_sheet.png (a row
of samples per setting, FID in the label) and fid_heatmap.png. --store writes the winner
(lowest FID) into the checkpoint's stored sampling settings, which models.load_model,
demo/sample.py and the notebook use from then on.
Unset axes (--cfg, --temperature, --num_iter_list) and --cfg_schedule / --filter_threshold
take the checkpoint's current sampling settings (FractalGen.sampling_config).
"""
import argparse
import datetime
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import util.misc as misc
from engine_fractalgen import evaluate_gen
from models import load_model
from models import sampling as provenance
from models.fractalgen import SAMPLING_KEYS
from models.loading import resolve_checkpoint
from models.sampling import format_fid
from util import checkpoint as ckpt_util
from util import fid, validation
from util.misc import UserInputError, print0

RESULTS_NAME, TABLE_NAME = "sweep.json", "table.txt"
SHEET_NAME, HEATMAP_NAME = "contact_sheet.png", "fid_heatmap.png"
SHEET_TILE = 64    # pixels: contact-sheet tiles are enlarged (nearest neighbour) to about this height
LABEL_WIDTH = 330  # pixels of the label column of the contact sheet
CELL = (84, 44)    # heat-map cell (width, height)


def get_args_parser():
    parser = argparse.ArgumentParser(
        "python -m util.sweep", description="Sweep cfg x temperature (x num_iter_list) by FID; --store keeps the best.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--resume", required=True, help="checkpoint: a folder holding checkpoint-last.pth, the file, or an official "
                                        "model name")
    add("--model", default=None, help="architecture, when the checkpoint does not say it")
    add("--cfg", default=None, help="guidance scales to try, e.g. 1,2,3,4 (default: the checkpoint's)")
    add("--temperature", default=None, help="temperatures to try, e.g. 0.9,1.0,1.1 (default: the checkpoint's)")
    add("--num_iter_list", default=None, nargs="+",
        help="iteration lists to try, e.g. 64,16 32,8 (default: the checkpoint's)")
    add("--cfg_schedule", default=None, choices=("linear", "constant"), help="default: the checkpoint's")
    add("--filter_threshold", default=None, type=float, help="default: the checkpoint's")
    add("--num_images", default=1000, type=int, help="images per setting (a multiple of the class count)")
    add("--gen_bsz", default=256, type=int, help="generation batch size per process")
    add("--data_path", default=None,
        help="dataset (its train/ folder, else the folder itself): FID statistics computed once, cached beside "
             "the checkpoint")
    add("--fid_stats_path", default=None, help="reference statistics npz (mu, sigma); instead of --data_path")
    add("--inception_weights", default=None, help="local Inception weights (default: torch-fidelity downloads)")
    add("--prc_ref_dir", default=None, help="folder of real images: also report precision / recall")
    add("--output_dir", default=None, help="default: a folder `sweep` beside the checkpoint")
    add("--store", action="store_true", help="write the best setting into the checkpoint's sampling settings")
    add("--sheet_images", default=8, type=int, help="samples per row of the contact sheet")
    add("--seed", default=0, type=int, help="sampling seed (the same for every setting)")
    add("--device", default=None, help="cpu, cuda or cuda:N; default cuda when available, else cpu")
    add("--precision", default=None, choices=("fp32", "bf16", "fp16"),
        help="autocast dtype; default fp16 on CUDA, fp32 on CPU (as --evaluate_gen)")
    add("--fast_sampling", nargs="?", const="compiled", default="off", choices=list(validation.FAST_SAMPLERS),
        help="the fast sampler (same distribution, other random draws). " + validation.FAST_HELP)
    add("--threads", default=None, type=int, help="CPU threads of each process (torch.set_num_threads)")
    add("--num_workers", default=4, type=int, help="image-reading workers for the FID statistics")
    add("--world_size", default=1, type=int, help="number of processes (set by the launcher)")
    add("--local_rank", "--local-rank", default=-1, type=int)
    add("--dist_on_itp", action="store_true")
    add("--dist_url", default="env://", help="rendezvous URL for init_process_group")
    add("--dist_timeout", default=misc.DIST_TIMEOUT_MINUTES, type=float,
        help="minutes a process waits for the others in a collective")
    return parser


# ---------------------------------------------------------------------- grid
def check_flags(args):
    """Every check of the flags alone (no file read): returns the parsed grid axes
    (cfgs, temperatures, num_iter_lists; None = the checkpoint's value)."""
    grid = validation.parse_sampling_grid(args.cfg, args.temperature, args.num_iter_list)
    validation.check_sampling_args(filter_threshold=args.filter_threshold)
    for flag in ("num_images", "gen_bsz", "sheet_images"):
        validation.positive_int(f"--{flag}", getattr(args, flag))
    validation.worker_count("--num_workers", args.num_workers)
    if args.threads is not None:
        validation.positive_int("--threads", args.threads)
    if args.data_path is None and args.fid_stats_path is None:
        raise UserInputError("FID needs reference statistics: pass --data_path DATA (computed once and cached) or "
                             "--fid_stats_path FILE.npz")
    return grid


def settings_grid(model, grid, args):
    """The settings to try, each a dict of SAMPLING_KEYS, in the order num_iter_list,
    temperature, cfg (cfg varies fastest)."""
    base = model.sampling_config(cfg_schedule=args.cfg_schedule, filter_threshold=args.filter_threshold)
    cfgs, temperatures, num_iter_lists = grid
    levels = model.num_fractal_levels - 1
    for num_iter_list in num_iter_lists or ():
        if len(num_iter_list) != levels:
            raise UserInputError(f"--num_iter_list {','.join(map(str, num_iter_list))} has {len(num_iter_list)} "
                                 f"entries but {model.model_name} has {levels} generator levels; give one per level")
    return [dict(base, num_iter_list=tuple(iters), temperature=float(temperature), cfg=float(cfg))
            for iters in num_iter_lists or [base["num_iter_list"]]
            for temperature in temperatures or [base["temperature"]]
            for cfg in cfgs or [base["cfg"]]]


def describe(setting):
    return (f"cfg {setting['cfg']:g}, temperature {setting['temperature']:g}, "
            f"num_iter_list {','.join(map(str, setting['num_iter_list']))}")


def same_setting(a, b):
    return all(_plain(a[k]) == _plain(b[k]) for k in SAMPLING_KEYS)


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


# ---------------------------------------------------------------------- identity of a run
def weights_fingerprint(model):
    """A short digest of the model's weights (name, shape and two sums of every tensor):
    results of another checkpoint, or of this one retrained, are never reused."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().double()
        digest.update(f"{name}{tuple(t.shape)}{t.sum().item():.10e}{t.abs().sum().item():.10e}".encode())
    return digest.hexdigest()[:16]


def file_digest(path):
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def run_context(args, model, stats_path):
    """What the numbers of a setting depend on besides the setting: results recorded
    under another context (other weights, reference, image count, seed...) are redone."""
    return {"weights": weights_fingerprint(model), "reference": file_digest(stats_path), "num_images": args.num_images,
            "seed": args.seed, "precision": args.precision, "fast_sampling": args.fast_sampling,
            "inception_weights": args.inception_weights and file_digest(args.inception_weights),
            "prc_ref_dir": args.prc_ref_dir and os.path.abspath(args.prc_ref_dir)}


# ---------------------------------------------------------------------- reference statistics
def data_images(data_path):
    """The real images of --data_path: its train/ folder when it has one, else the folder."""
    train = os.path.join(data_path, "train")
    folder = train if os.path.isdir(train) else data_path
    return folder, fid.list_images(folder)


def cached_stats_path(ckpt_path, folder, files, img_size, weights):
    """Where the statistics of `folder` live beside the checkpoint: the name carries the
    folder, the image size and a digest of (path, image count, Inception weights), so
    other data, more images or other weights get a file of their own."""
    key = json.dumps([os.path.abspath(folder), len(files), img_size, weights and os.path.abspath(weights)])
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    name = os.path.basename(os.path.normpath(os.path.dirname(folder) if os.path.basename(folder) == "train"
                                             else folder))
    return os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), f"fid_stats-{name}-in{img_size}-{digest}.npz")


def reference_stats(args, ckpt_path, img_size, inception, device):
    """Path of the FID reference: --fid_stats_path, else the cached statistics of
    --data_path (computed now, every rank extracting its share, when not cached yet)."""
    if args.fid_stats_path:
        return args.fid_stats_path
    folder, files = data_images(args.data_path)
    path = cached_stats_path(ckpt_path, folder, files, img_size, args.inception_weights)
    if from_rank0(os.path.isfile(path)):  # rank 0's file decides: the folder need not be shared
        print0(f"FID reference: {path} (statistics of {len(files)} images in {folder}, cached)")
        return path
    print0(f"FID reference: statistics of {len(files)} images in {folder} (centre-cropped to {img_size}), "
           f"cached in {path}")
    features = fid.extract_features(files, inception, device, img_size=img_size, num_workers=args.num_workers)
    if misc.is_main_process():
        mu, sigma = fid.mean_and_cov(features[fid.FID_FEATURE])
        with misc.writing(path, flag="--fid_stats_path"):
            fid.save_stats(path, mu, sigma)
    misc.barrier()
    return path


def from_rank0(value):
    """Rank 0's `value` on every rank (what rank 0 found on its disk decides for all)."""
    if not misc.is_dist():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------- results
def load_results(path):
    """The recorded settings of earlier runs ([] when there is no file yet)."""
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            results = json.load(f)["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserInputError(f"cannot read {path} ({e}); delete it to start the sweep afresh") from None
    return results


def save_results(path, results):
    """Atomically: an interruption mid-write leaves the previous file whole."""
    with misc.writing(path), misc.replacing(path) as tmp:
        with open(tmp, "w") as f:
            json.dump({"results": results}, f, indent=1)


def find_result(results, context, setting):
    for entry in results:
        if entry.get("context") == context and same_setting(entry["setting"], setting):
            return entry
    return None


def best_index(rows):
    """Index of the row with the lowest FID (the first of equals)."""
    return min(range(len(rows)), key=lambda i: rows[i]["metrics"]["fid"])


def format_table(rows, best, num_images):
    """The results as a text table, the best row marked."""
    show_prc = all("precision" in row["metrics"] for row in rows)
    header = ["", "cfg", "temperature", "num_iter_list", f"FID ({num_images} img)", "IS"]
    if show_prc:
        header += ["precision", "recall"]
    header += ["s/image"]
    lines = []
    for i, row in enumerate(rows):
        s, m = row["setting"], row["metrics"]
        cells = ["*" if i == best else "", f"{s['cfg']:g}", f"{s['temperature']:g}",
                 ",".join(map(str, s["num_iter_list"])), format_fid(m["fid"]), f"{m['inception_score']:.2f}"]
        if show_prc:
            cells += [f"{m['precision']:.3f}", f"{m['recall']:.3f}"]
        cells += [f"{row['sec_per_image']:.4f}"]
        lines.append(cells)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines)]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [header] + lines]
    text[best + 1] += "   <- best (lowest FID)"
    return "\n".join(text)


# ---------------------------------------------------------------------- pictures
def _font(size):
    return ImageFont.load_default(size)


def sample_tiles(folder, count):
    """`count` of the setting's PNGs spread evenly over the image ids (so over the classes:
    the labels run 0,0,..,1,1,..); None when the folder is gone. Under several processes
    without a shared folder, rank 0 picks among the images it wrote."""
    if not os.path.isdir(folder):
        return None
    files = sorted(name for name in os.listdir(folder) if name.endswith(".png"))
    if not files:
        return None
    tiles = []
    for index in sorted({int(i * len(files) / count) for i in range(count)}):
        with Image.open(os.path.join(folder, files[index])) as image:
            tiles.append(image.convert("RGB"))
    return tiles


def contact_sheet(rows, best, path, num_images, per_row):
    """One row per setting: the label (settings, FID) and `per_row` of its samples."""
    font = _font(15)
    strips = [sample_tiles(row["folder"], per_row) for row in rows]
    size = next((tiles[0].size for tiles in strips if tiles), (16, 16))
    scale = max(1, round(SHEET_TILE / size[1]))
    tile_w, tile_h = size[0] * scale, size[1] * scale
    pad, title_h = 4, 28
    width = LABEL_WIDTH + per_row * (tile_w + pad) + pad
    sheet = Image.new("RGB", (width, title_h + len(rows) * (tile_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 6), f"samples per setting ({per_row} of {num_images}; FID on {num_images} images)",
              fill="black", font=font)
    for i, (row, tiles) in enumerate(zip(rows, strips)):
        y = title_h + i * (tile_h + pad) + pad
        if i == best:
            draw.rectangle([0, y - pad // 2, width - 1, y + tile_h + pad // 2 - 1], fill=(255, 236, 160))
        s = row["setting"]
        label = [f"cfg {s['cfg']:g}  temperature {s['temperature']:g}",
                 f"iters {','.join(map(str, s['num_iter_list']))}  FID {format_fid(row['metrics']['fid'])}"
                 + ("  (best)" if i == best else "")]
        draw.multiline_text((pad, y + max(0, (tile_h - 36) // 2)), "\n".join(label), fill="black", font=font)
        if tiles is None:
            draw.text((LABEL_WIDTH, y + tile_h // 2 - 8), f"(images gone from {row['folder']})", fill="grey", font=font)
            continue
        for j, tile in enumerate(tiles):
            sheet.paste(tile.resize((tile_w, tile_h), Image.NEAREST), (LABEL_WIDTH + j * (tile_w + pad), y))
    _save_png(sheet, path)
    return path


# viridis at 0, 1/4, 1/2, 3/4, 1: dark purple (worst) ... yellow (best)
_COLOURS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=float)


def _colour(x):
    """x in [0, 1] -> RGB along the palette."""
    pos = min(max(x, 0.0), 1.0) * (len(_COLOURS) - 1)
    i = min(int(pos), len(_COLOURS) - 2)
    return tuple(int(round(v)) for v in _COLOURS[i] + (pos - i) * (_COLOURS[i + 1] - _COLOURS[i]))


def heat_map(rows, best, path, num_images, reference):
    """FID over the grid: temperature down, cfg across, one panel per num_iter_list;
    bright is low FID (better), the best cell outlined."""
    font, small = _font(15), _font(13)
    cfgs = sorted({row["setting"]["cfg"] for row in rows})
    temperatures = sorted({row["setting"]["temperature"] for row in rows})
    iter_lists = sorted({tuple(row["setting"]["num_iter_list"]) for row in rows})
    fids = [row["metrics"]["fid"] for row in rows]
    lo, hi = min(fids), max(fids)
    left, top, title_h, panel_gap = 110, 52, 58, 30
    cw, ch = CELL
    panel_h = top + len(temperatures) * ch
    width = left + len(cfgs) * cw + 20
    image = Image.new("RGB", (max(width, 520), title_h + len(iter_lists) * (panel_h + panel_gap)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), f"FID vs {os.path.basename(reference)} ({num_images} images per setting)", fill="black",
              font=font)
    draw.text((8, 28), "lower is better: bright = low FID; the outlined cell is the best", fill="black", font=small)
    for p, iters in enumerate(iter_lists):
        y0 = title_h + p * (panel_h + panel_gap)
        draw.text((8, y0 + 4), f"num_iter_list {','.join(map(str, iters))}", fill="black", font=font)
        for c, cfg in enumerate(cfgs):
            draw.text((left + c * cw + cw // 2 - 10, y0 + top - 18), f"{cfg:g}", fill="black", font=small)
        draw.text((8, y0 + top - 18), "temperature \\ cfg", fill="black", font=small)
        for t, temperature in enumerate(temperatures):
            y = y0 + top + t * ch
            draw.text((30, y + ch // 2 - 8), f"{temperature:g}", fill="black", font=small)
            for c, cfg in enumerate(cfgs):
                x = left + c * cw
                match = [i for i, row in enumerate(rows) if row["setting"]["cfg"] == cfg
                         and row["setting"]["temperature"] == temperature
                         and tuple(row["setting"]["num_iter_list"]) == iters]
                if not match:
                    draw.rectangle([x, y, x + cw - 2, y + ch - 2], fill=(220, 220, 220))
                    draw.text((x + cw // 2 - 6, y + ch // 2 - 8), "-", fill="grey", font=small)
                    continue
                value = rows[match[0]]["metrics"]["fid"]
                shade = 1.0 if hi == lo else (hi - value) / (hi - lo)
                fill = _colour(shade)
                draw.rectangle([x, y, x + cw - 2, y + ch - 2], fill=fill)
                ink = "black" if sum(fill) > 380 else "white"
                draw.text((x + 8, y + ch // 2 - 8), format_fid(value), fill=ink, font=small)
                if match[0] == best:
                    draw.rectangle([x, y, x + cw - 2, y + ch - 2], outline=(220, 20, 60), width=4)
    _save_png(image, path)
    return path


def _save_png(image, path):
    with misc.writing(path), misc.replacing(path) as tmp:
        image.save(tmp, format="PNG")


# ---------------------------------------------------------------------- main
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        return run(args)
    except UserInputError as e:
        raise SystemExit(f"error: {misc.one_line(e)}") from None
    except KeyboardInterrupt:
        print(f"rank {misc.get_rank()}: interrupted; the settings finished so far are recorded: rerun the same "
              f"command to continue", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    finally:
        misc.cleanup_distributed()


def run(args):
    grid = check_flags(args)
    if args.fid_stats_path:
        fid.load_stats(args.fid_stats_path)
    device = misc.init_distributed_mode(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.precision = misc.resolve_precision(args.precision, device)
    ckpt_path = resolve_checkpoint(args.resume)
    model = load_model(ckpt_path, model=args.model, device=device)
    settings = settings_grid(model, grid, args)
    validation.check_num_images(args.num_images, model.class_num)
    if args.data_path and not args.fid_stats_path:
        data_images(args.data_path)  # the folder holds images
    if args.prc_ref_dir:
        fid.check_prc_ref_dir(args.prc_ref_dir, args.num_images)
    if args.inception_weights is None:  # a download into the cache: once, by rank 0
        misc.rank0_first(fid.inception_weights_file, "download the Inception weights", device)
    output_dir = args.output_dir or os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "sweep")
    with misc.writing(output_dir):
        if misc.is_main_process():
            os.makedirs(output_dir, exist_ok=True)

    inception = fid.build_inception(device, args.inception_weights)
    stats_path = reference_stats(args, ckpt_path, model.img_size, inception, device)
    scorer = fid.Scorer(device, stats_path, inception=inception, prc_ref_dir=args.prc_ref_dir,
                        img_size=model.img_size, num_workers=min(args.num_workers, 8))
    # rank 0 keeps the results (the output folder need not be shared) and says what is left
    results_path = os.path.join(output_dir, RESULTS_NAME)
    context = results = None
    if misc.is_main_process():
        context = run_context(args, model, stats_path)
        results = load_results(results_path)
    todo = from_rank0(None if results is None else
                      [i for i, s in enumerate(settings) if find_result(results, context, s) is None])
    todo = [settings[i] for i in todo]
    print0(f"sweep of {ckpt_path}: {len(settings)} settings x {args.num_images} images"
           + (f" ({len(settings) - len(todo)} already done in {results_path})" if len(todo) < len(settings) else "")
           + f"; {misc.get_world_size()} process(es) on {device}")

    start = time.time()
    for n, setting in enumerate(todo):
        eta = "" if n == 0 else f"; sweep ETA {misc.format_seconds((time.time() - start) / n * (len(todo) - n))}"
        print0(f"setting {n + 1}/{len(todo)}: {describe(setting)}{eta}")
        began = time.time()
        gen = evaluate_gen(model, setting_args(args, setting, output_dir, model), scorer=scorer)
        if misc.is_main_process():
            metrics = {k: v for k, v in gen.items() if k not in ("folder", "sec_per_image")}
            results.append({"context": context, "setting": {k: _plain(v) for k, v in setting.items()},
                            "metrics": metrics, "sec_per_image": gen["sec_per_image"], "folder": gen["folder"],
                            "seconds": time.time() - began})
            save_results(results_path, results)
    if not misc.is_main_process():
        return None
    return report(args, model, settings, results, context, ckpt_path, stats_path, output_dir)


def setting_args(args, setting, output_dir, model):
    """The --evaluate_gen arguments (engine_fractalgen.evaluate_gen) of one setting."""
    return argparse.Namespace(
        **setting, device=args.device, seed=args.seed, num_images=args.num_images, class_num=model.class_num,
        gen_bsz=args.gen_bsz, precision=args.precision, fast_sampling=args.fast_sampling, output_dir=output_dir,
        img_size=model.img_size, fid_stats_path=None, inception_weights=args.inception_weights,
        prc_ref_dir=args.prc_ref_dir, num_workers=args.num_workers)


def report(args, model, settings, results, context, ckpt_path, stats_path, output_dir):
    """Table, pictures and --store, from the recorded results of this grid (rank 0)."""
    rows = [find_result(results, context, s) for s in settings]
    best = best_index(rows)
    table = format_table(rows, best, args.num_images)
    header = (f"sweep of {ckpt_path}\nFID against {stats_path}, {args.num_images} class-balanced images per "
              f"setting, seed {args.seed}")
    with misc.writing(os.path.join(output_dir, TABLE_NAME)), misc.replacing(os.path.join(output_dir, TABLE_NAME)) as tmp:
        with open(tmp, "w") as f:
            f.write(f"{header}\n\n{table}\n")
    print(f"\n{header}\n\n{table}\n", flush=True)
    sheet = contact_sheet(rows, best, os.path.join(output_dir, SHEET_NAME), args.num_images, args.sheet_images)
    heat = heat_map(rows, best, os.path.join(output_dir, HEATMAP_NAME), args.num_images, stats_path)
    print(f"wrote {os.path.join(output_dir, TABLE_NAME)}, {sheet}, {heat}")
    winner = rows[best]
    if args.store:
        epoch, step = model.checkpoint_position
        source = {"by": provenance.BY_SWEEP, "fid": winner["metrics"]["fid"], "num_images": args.num_images,
                  "reference": os.path.abspath(stats_path),
                  "inception_weights": args.inception_weights and os.path.abspath(args.inception_weights),
                  "settings_tried": len(rows), "epoch": epoch, "step": step, "weights": model.weights,
                  "date": datetime.date.today().isoformat()}
        with misc.writing(ckpt_path, flag="--resume"):
            ckpt_util.store_sampling(ckpt_path, {k: winner["setting"][k] for k in SAMPLING_KEYS}, source)
        print(f"stored in {ckpt_path}: {describe(winner['setting'])} (FID {format_fid(winner['metrics']['fid'])}); "
              f"models.load_model, demo/sample.py, the notebook and --evaluate_gen now sample with it")
    else:
        print(f"best: {describe(winner['setting'])}; rerun with --store to make it the checkpoint's default "
              f"(the finished settings are not redone)")
    return {"rows": rows, "best": best, "table": table, "sheet": sheet, "heat_map": heat,
            "stats_path": stats_path, "output_dir": output_dir}


if __name__ == "__main__":
    main()
