"""Training and evaluation loops: one epoch of training, bits/dim on the val set, and
class-conditional generation scored with FID / Inception Score."""
import argparse
import glob
import json
import math
import os
import shutil
import time

import numpy as np
import torch
from PIL import Image

import util.lr_sched as lr_sched
import util.misc as misc
from models.checks import SAMPLING_KEYS
from util import fid, preempt, validation
from util.data import IMAGE_MODES
from util.visualize import to_pil

PRINT_FREQ = 20
TRAIN_STREAM = 3  # last seed key of training steps (generation uses 1, NLL 2)
GEN_STREAM = 1
RECORD_SUFFIX = ".json"  # beside an --evaluate_gen folder: what its images depend on


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops before the step is applied."""


def unwrap(model):
    """The FractalGen inside a DistributedDataParallel wrapper."""
    return getattr(model, "module", model)


# TensorBoard tags written once per training step, on the step_axis; every other tag is
# written per epoch with the epoch as its step (a resume rewinds the two axes apart)
STEP_TAGS = ("train_loss", "lr")


class TrainingStopped(Exception):
    """A stop was requested (a signal on some rank); training ended after `step` steps of
    `epoch`, every rank at the same point, and that point is checkpointed."""

    def __init__(self, epoch, step, steps, signal_name):
        super().__init__(f"stopped at epoch {epoch}, step {step} of {steps}")
        self.epoch, self.step, self.steps, self.signal_name = epoch, step, steps, signal_name


def step_axis(epoch, step, steps):
    """TensorBoard x of a step: thousandths of an epoch, so curves of runs with different
    batch sizes line up."""
    return int((epoch + step / steps) * 1000)


def train_one_epoch(model, data_loader, optimizer, scaler, epoch, args, log_writer=None, start_step=0,
                    checkpoints=None, ema=None):
    """One pass over `data_loader` (a ResumableSampler shard per rank), from `start_step`
    (its sampler already skips the steps before).

    model: the (possibly DDP-wrapped) FractalGen in training mode; the loss is its forward
    (nats per sub-pixel, red channel weighted by r_weight). The learning rate follows the
    per-iteration schedule; gradients are unscaled (fp16), clipped to args.grad_clip, then
    applied. Every step reseeds torch / numpy / random from (seed, epoch, step, rank), so
    dropout, masks and label drops depend on the step alone and a resumed run replays them.

    checkpoints (optional) decides about step-level checkpoints and stops: its `flags()`
    (stop requested here, time-based save due here) ride on the step's loss all-reduce, and
    `save(epoch, step, steps, meters)` writes the state after `step` steps. A stop raises
    TrainingStopped once that checkpoint is written. ema (optional, util.ema.EMA) is
    updated after every optimizer step. Returns the epoch's averaged stats
    {'loss', 'lr'} over all ranks (including steps run before a resume)."""
    device = torch.device(args.device)
    rank, world_size = misc.get_rank(), misc.get_world_size()
    model.train(True)
    logger = misc.MetricLogger()
    logger.add_meter("lr", misc.SmoothedValue(window_size=1, fmt="{value:.2e}"))
    if checkpoints is not None:
        checkpoints.restore_meters(logger)
    header = f"Epoch: [{epoch}]"
    steps = start_step + len(data_loader)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)

    for step, (imgs, labels) in enumerate(logger.log_every(data_loader, PRINT_FREQ, header), start=start_step):
        misc.seed_everything(args.seed, epoch, step, rank, TRAIN_STREAM)
        lr = lr_sched.adjust_learning_rate(optimizer, epoch + step / steps, args)
        imgs = imgs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)

        with misc.autocast(device, args.precision):
            loss = model(imgs, labels)
        # One all-reduce per step: the logged loss is the global mean, a NaN on any rank
        # stops every rank at the same step (a lone rank leaving would hang the others),
        # and so does a stop request or a due checkpoint on any rank.
        flags = checkpoints.flags() if checkpoints is not None else [0, 0]
        loss_sum, stops, saves_due = misc.all_reduce_sum([loss.item(), *flags], device)
        loss_mean = loss_sum / world_size
        if not math.isfinite(loss_mean):
            raise NonFiniteLossError(
                f"training loss is {loss_mean} at epoch {epoch}, step {step}; stopping without applying this "
                f"step (the last checkpoint is kept). Lower --blr, raise --warmup_epochs, or try "
                f"--precision fp32/bf16")

        scaler.scale(loss).backward()
        if args.grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()

        logger.update(loss=loss_mean, lr=lr)
        if log_writer is not None:
            x = step_axis(epoch, step, steps)
            log_writer.add_scalar("train_loss", loss_mean, x)
            log_writer.add_scalar("lr", lr, x)
        if checkpoints is not None and (stops or saves_due or checkpoints.step_due(epoch, step + 1, steps)):
            checkpoints.save(epoch, step + 1, steps, logger.meters)
        if stops:
            raise TrainingStopped(epoch, step + 1, steps, preempt.requested())

    misc.print0(f"{header} averaged stats: {logger}")
    return {name: meter.global_avg for name, meter in logger.meters.items()}


@torch.no_grad()
def evaluate_nll(model, data_loader, args, epoch=0, log_writer=None):
    """Unconditional negative log-likelihood of the val set in bits per dimension.

    Each batch's loss is averaged over args.nll_forward_number forward passes (MAR levels
    draw a random mask count per pass; AR gives the same value every time). Every rank
    sums loss x images over its shard (ShardSampler: no padded duplicates), and the sums
    are all-reduced, so each val image counts exactly once. Returns {'nll', 'bpd', 'images'}."""
    device = torch.device(args.device)
    model = unwrap(model)
    model.eval()
    misc.seed_everything(args.seed, misc.get_rank(), epoch, 2)  # MAR mask counts: reproducible per rank
    loss_sum, count = 0.0, 0
    bar = misc.progress(data_loader, "NLL", unit="batch")
    for imgs, labels in bar:
        imgs = imgs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with misc.autocast(device, args.precision):
            loss = sum(model(imgs, labels).float() for _ in range(args.nll_forward_number))
        loss = loss.item() / args.nll_forward_number
        loss_sum += loss * imgs.shape[0]
        count += imgs.shape[0]
        bar.set_postfix_str(f"{loss_sum / count / math.log(2):.4f} bits/dim (this rank)", refresh=False)
    loss_sum, count = misc.all_reduce_sum([loss_sum, count], device)
    nll = loss_sum / max(count, 1)
    result = {"nll": nll, "bpd": nll / math.log(2), "images": int(count)}
    # guiding-pixel models add one guiding-pixel term per level > 0 to the loss (official behaviour)
    extra = any(getattr(m, "guiding_pixel", False) is True for m in model.modules())
    misc.print0(f"NLL over {result['images']} val images ({args.nll_forward_number} forward pass(es) each): "
                f"{result['bpd']:.5f} bits/dim ({nll:.5f} nats/dim)"
                + (", guiding-pixel terms included" if extra else ""))
    if log_writer is not None:
        log_writer.add_scalar("val_bpd", result["bpd"], epoch)
    return result


def generation_labels(num_images, class_num):
    """Class-balanced labels 0,0,..,1,1,..: each class num_images / class_num times."""
    return torch.arange(class_num).repeat_interleave(num_images // class_num)


def rank_batches(num_images, batch_size, rank, world_size):
    """Image ids each generation step of this rank covers: step s takes the global block
    [s*B*W, (s+1)*B*W) and rank r its r-th slice of B ids, so ids are unique across ranks
    and together cover 0..num_images-1 (the last step may be short or empty)."""
    per_step = batch_size * world_size
    for start in range(0, num_images, per_step):
        begin = start + rank * batch_size
        yield range(begin, min(begin + batch_size, num_images))


def sampling_flags(args):
    """The sampling settings args gives (None: not given), by SAMPLING_KEYS."""
    return {key: getattr(args, key, None) for key in SAMPLING_KEYS}


def generation_args(model, args):
    """A copy of args with every sampling setting resolved: the ones given, the rest the
    model's (FractalGen.sampling_config: the checkpoint's stored settings, ...)."""
    settings = unwrap(model).sampling_config(**sampling_flags(args))
    return argparse.Namespace(**{**vars(args), **settings})


ONLINE_PREFIX = "tmp-gen-"  # the folders of online evaluations, deleted after each


def generation_folder(args, online):
    name = (f"iter{'-'.join(map(str, args.num_iter_list))}-cfg{args.cfg}{args.cfg_schedule}"
            f"-temp{args.temperature}-filter{args.filter_threshold}-image{args.num_images}")
    return os.path.join(args.output_dir, (ONLINE_PREFIX if online else "gen-") + name)


def remove_stale_online_folders(folder):
    """Delete the online-evaluation folders a killed run left in `folder`; their names."""
    stale = [name for name in os.listdir(folder)
             if name.startswith(ONLINE_PREFIX) and os.path.isdir(os.path.join(folder, name))]
    for name in stale:
        with misc.writing(folder):
            shutil.rmtree(os.path.join(folder, name))
    return stale


def save_png(image, path):
    """uint8 (C, H, W) tensor -> PNG of mode L, LA, RGB or RGBA (lossless, so FID sees
    exactly the generated pixels), written to a temporary name and renamed: a PNG under its
    final name is complete. A failed write (disk full, no permission) names the file and
    leaves nothing behind."""
    with misc.writing(path), misc.replacing(path) as tmp:
        to_pil(image).save(tmp, format="PNG")


def read_png(path, channels=3):
    """A complete generated PNG of `channels` channels as uint8 (C, H, W), or None
    (missing, damaged, or of another mode)."""
    try:
        with Image.open(path) as image:
            if image.mode != IMAGE_MODES.get(channels):
                return None
            pixels = np.asarray(image)
    except (OSError, ValueError, SyntaxError):
        return None
    pixels = pixels.reshape(pixels.shape[0], pixels.shape[1], -1)  # (H, W, C); grey PNGs read as (H, W)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def prepare_folder(folder, record=None):
    """Create `folder` (rank 0) and keep its PNGs only when they come from the same
    generation: `record` (a JSON-able dict of everything the images depend on) equals the
    one in `<folder>.json`. Otherwise the PNGs go (leftovers of other settings would count
    in the FID) and the record is written. Temp files of killed writes always go. Returns
    how many PNGs were kept (rank 0; 0 elsewhere)."""
    kept = 0
    if misc.is_main_process():
        with misc.writing(folder):
            os.makedirs(folder, exist_ok=True)
            for stale in glob.glob(os.path.join(glob.escape(folder), "*.png.tmp-*")):
                os.remove(stale)
            record_path = folder.rstrip(os.sep) + RECORD_SUFFIX
            pngs = [name for name in os.listdir(folder) if name.endswith(".png")]
            if record is not None and pngs and _read_record(record_path) == record:
                kept = len(pngs)
            else:
                for name in pngs:
                    os.remove(os.path.join(folder, name))
                if pngs:
                    misc.print0(f"removed {len(pngs)} images from {folder}: they were generated with other settings "
                                f"or weights")
                if record is not None:
                    with misc.replacing(record_path) as tmp, open(tmp, "w") as f:
                        json.dump(record, f, indent=1)
        if kept:
            misc.print0(f"{folder} holds {kept} images of an interrupted run with the same settings and weights: "
                        f"generating only the missing ones")
    misc.barrier()
    return kept


def _read_record(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def generation_record(args, weights):
    """What the images of an --evaluate_gen folder depend on: the weights (`weights`, a
    fingerprint of the checkpoint), the seed, the sampling settings, the batch layout
    (a batch is generated together; batches start at multiples of --gen_bsz whatever the
    process count) and the numerics (precision, fast sampler)."""
    return {"weights": weights, "model": args.model, "seed": args.seed, "num_images": args.num_images,
            "class_num": args.class_num, "gen_bsz": args.gen_bsz, "num_iter_list": list(args.num_iter_list),
            "cfg": args.cfg, "cfg_schedule": args.cfg_schedule, "temperature": args.temperature,
            "filter_threshold": args.filter_threshold, "img_size": args.img_size, "precision": args.precision,
            "fast_sampling": str(getattr(args, "fast_sampling", "off")), "device_type": torch.device(args.device).type}


@torch.no_grad()
def evaluate_gen(model, args, epoch=0, log_writer=None, online=False, scorer=None, weights=None):
    """Generate args.num_images class-balanced images across all ranks, write them as
    PNGs and score them with FID and Inception Score against args.fid_stats_path (plus
    precision/recall with args.prc_ref_dir).

    Every rank runs the Inception network on the images it generated, as it generates
    them; the features are gathered in image-id order and scored once, on rank 0: the
    numbers are those of the PNG folder scored by one process (util.fid.evaluate_folder).
    online=True (during training) writes into a temporary folder that is deleted afterwards.
    scorer: a util.fid.Scorer to reuse (a sweep scores many settings with one); None
    builds one from args. Sampling settings args leaves at None are the model's
    (generation_args), in the folder name and the TensorBoard tags too.
    An interrupted --evaluate_gen resumes: the PNGs already in the folder are kept when
    `weights` (a fingerprint of the checkpoint; None: nothing is kept) and every setting
    the images depend on are the same (generation_record), and only the missing ones are
    generated, each batch with the random stream it has in an uninterrupted run.
    Returns {'fid', 'inception_score', ..., 'sec_per_image', 'folder'} on rank 0 and
    {'sec_per_image', 'folder'} elsewhere."""
    device = torch.device(args.device)
    model = unwrap(model)
    model.eval()
    args = generation_args(model, args)
    folder = generation_folder(args, online)
    if model.in_channels != 3:
        misc.print0(f"FID / Inception Score of {model.in_channels}-channel images: Inception sees them "
                    f"{fid.rgb_view(model.in_channels)} (util.fid.inception_rgb), as util.fid_stats does to "
                    f"reference images")
    prepare_folder(folder, None if online or weights is None else generation_record(args, weights))
    if scorer is None:
        scorer = fid.Scorer(device, args.fid_stats_path, args.inception_weights, args.prc_ref_dir,
                            img_size=args.img_size, num_workers=min(args.num_workers, 8))
    features = scorer.feature_bank()
    sec_per_image = generate_images(model, args, epoch, folder, features)
    result = {"sec_per_image": sec_per_image, "folder": folder}
    metrics = scorer.score(features)
    if misc.is_main_process():
        result.update(metrics)
        report = ", ".join(f"{k}: {v:.4f}" for k, v in result.items() if k != "folder")
        misc.print0(f"epoch {epoch}: {report}")
        if log_writer is not None:
            suffix = f"_cfg{args.cfg}"
            log_writer.add_scalar(f"fid{suffix}", result["fid"], epoch)
            log_writer.add_scalar(f"is{suffix}", result["inception_score"], epoch)
            for key in ("precision", "recall"):
                if key in result:
                    log_writer.add_scalar(f"{key}{suffix}", result[key], epoch)
    misc.barrier()  # every rank has written its PNGs before rank 0 deletes a temporary folder
    if online and misc.is_main_process():
        shutil.rmtree(folder, ignore_errors=True)
    return result


def generate_images(model, args, epoch, folder, features):
    """This rank's share of the images: generated, written to `folder` as PNGs and added
    to `features` (a FeatureBank). Each batch draws from its own random stream, keyed by
    its first image id, so a batch whose PNGs are all in the folder already (an
    interrupted run) is read instead of generated and the others come out as they would
    have. Returns the seconds per image per process, all ranks averaged (the first batch,
    which pays for warm-up, is timed apart)."""
    device = torch.device(args.device)
    rank, world_size = misc.get_rank(), misc.get_world_size()
    labels = generation_labels(args.num_images, args.class_num)
    digits = max(5, len(str(args.num_images - 1)))
    batches = list(rank_batches(args.num_images, args.gen_bsz, rank, world_size))
    timed_seconds = timed_images = 0.0
    first_seconds = first_images = None
    kept = 0
    for ids in misc.progress(batches, "Generation", unit="batch"):
        if len(ids) == 0:
            continue
        paths = [os.path.join(folder, f"{image_id:0{digits}d}.png") for image_id in ids]
        done = [read_png(path, model.in_channels) for path in paths]
        if all(image is not None for image in done):
            features.add(torch.stack(done), ids)
            kept += len(ids)
            continue
        misc.seed_everything(args.seed, epoch, GEN_STREAM, ids.start)
        misc.synchronize(device)
        start = time.perf_counter()
        with misc.autocast(device, args.precision):
            images = model.generate(labels[ids.start:ids.stop].to(device), num_iter_list=args.num_iter_list,
                                    cfg=args.cfg, cfg_schedule=args.cfg_schedule, temperature=args.temperature,
                                    filter_threshold=args.filter_threshold,
                                    fast=validation.fast_sampler(getattr(args, "fast_sampling", "off")))
        misc.synchronize(device)
        seconds = time.perf_counter() - start
        if first_seconds is None:
            first_seconds, first_images = seconds, len(ids)
        else:
            timed_seconds, timed_images = timed_seconds + seconds, timed_images + len(ids)
        features.add(images, ids)  # (B, C, H, W) uint8, the very pixels the PNGs hold
        for image, path, old in zip(images.cpu(), paths, done):
            if old is None:
                save_png(image, path)

    timed_seconds, timed_images, first_seconds, first_images, kept = misc.all_reduce_sum(
        [timed_seconds, timed_images, first_seconds or 0.0, first_images or 0, kept], device)
    if timed_images:
        sec_per_image = timed_seconds / timed_images
        note = "first batch excluded"
    else:  # a single batch per rank: nothing left to time without warm-up
        sec_per_image = first_seconds / max(first_images, 1)
        note = "single batch, includes warm-up"
    resumed = f", {int(kept)} of them kept from an interrupted run" if kept else ""
    misc.print0(f"generated {args.num_images} images into {folder}{resumed}: {sec_per_image:.4f} s per image per "
                f"process ({note}; {world_size} process(es))")
    return sec_per_image
