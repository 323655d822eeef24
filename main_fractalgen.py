"""Train and evaluate FractalGen models.

    python main_fractalgen.py --model fractalmar_tiny --data_path DATA --output_dir out --device cpu
    torchrun --nproc_per_node=8 main_fractalgen.py --model fractalmar_in64 ...      # one node, 8 GPUs

The same code runs as one plain process (CPU or GPU), as several processes launched by
torchrun or SLURM `srun` (gloo on CPU, NCCL on GPU), and on many nodes. Modes: training
(default; `--online_eval` adds FID during training), `--evaluate_nll` (bits/dim of the
val set) and `--evaluate_gen` (generate `--num_images` images, FID and Inception Score).
Other code can call `main(get_args_parser().parse_args([...]))` in-process.
"""
import argparse
import contextlib
import datetime
import math
import os
import sys
import time

if __name__ == "__main__":  # a signal during the seconds of imports below: main() stops with one line
    from util import preempt as _startup_signals
    _startup_signals.install("startup")

import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel

import util.misc as misc
from engine_fractalgen import (STEP_TAGS, NonFiniteLossError, TrainingStopped, evaluate_gen, evaluate_nll,
                               remove_stale_online_folders, sampling_flags, step_axis, train_one_epoch)
from models import CONFIGS, CheckpointMismatchError, create_model
from models import sampling as provenance
from models.config import SAMPLING, config_name, is_config_file
from models.fractalgen import check_state_dict
from models.loading import (CONFIG, EMA_KEY, SAMPLING_SOURCE, checkpoint_args, checkpoint_config,
                            checkpoint_sampling, stored_sampling)
from util import checkpoint as ckpt_util
from util import data as data_util
from util import claim, cli, fid, logs, memory, preempt, validation
from util.ema import EMA
from util.misc import UserInputError, print0

PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_MODEL = "fractalmar_in64"
# the official training recipe's values of these FractalGen keywords, where neither a flag
# nor the configuration record sets them
TRAINING_DEFAULTS = dict(label_drop_prob=0.1, attn_dropout=0.1, proj_dropout=0.1, r_weight=5.0)
# stored with the checkpoints of one-class (unconditional) models: sampling without guidance
UNCONDITIONAL_SAMPLING = {"cfg": 1.0}
UNCONDITIONAL_SOURCE = {"by": provenance.BY_ONE_CLASS}


def get_args_parser():
    parser = cli.ArgumentParser(description="FractalGen training and evaluation.")
    add = parser.add_argument
    # training
    add("--batch_size", default=64, type=int, help="images per process and step (effective: x processes)")
    add("--epochs", default=400, type=int)
    add("--seed", default=0, type=int)
    add("--resume", default="", help="folder holding checkpoint-last.pth (or the file) to resume or evaluate; "
                                     "equal to --output_dir it may not exist yet (fresh start)")
    add("--start_epoch", default=0, type=int, help="first epoch when not resuming")
    add("--num_workers", default=None, type=int,
        help=f"data loader worker processes per process; default: min({cli.MAX_DEFAULT_WORKERS}, CPU cores) "
             f"= {cli.default_num_workers()} here")
    cli.add_threads_flag(parser)
    add("--pin_mem", action="store_true", help="pin CPU memory in the DataLoader (default; CUDA only)")
    add("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)
    add("--precision", default=None, choices=PRECISIONS,
        help="autocast dtype; default fp16 on CUDA (as the official code; with a gradient scaler), "
             "fp32 on CPU; bf16 needs no scaler")
    add("--compile", action="store_true",
        help="torch.compile every transformer block (training, NLL and generation; off by default: the first "
             "steps compile, and floats differ from eager at rounding level)")
    add("--fast_sampling", nargs="?", const="compiled", default="off", choices=list(validation.FAST_SAMPLERS),
        help="--evaluate_gen / online eval with the fast sampler (the same distribution, other random draws); "
             "alone it means compiled. " + validation.FAST_HELP)

    # model
    add("--model", default=None, metavar="MODEL",
        help=f"a model name ({', '.join(CONFIGS)}) or a JSON configuration file of FractalGen keywords "
             f"(docs/your-own-data.md); default: the checkpoint's configuration when resuming, else {DEFAULT_MODEL}")
    add("--img_size", default=None, type=int, help="image size; default: the model's (must match it)")
    add("--num_conds", default=None, type=int, help="conditions per MAR level; default: the model's")
    add("--guiding_pixel", default=None, action="store_true", help="use guiding pixels; default: the model's")
    add("--no_guiding_pixel", dest="guiding_pixel", action="store_false")
    add("--grad_checkpointing", default=None, action="store_true",
        help="recompute activations in backward (less memory); default: the configuration's, else off")
    add("--no_memory_check", action="store_true",
        help="skip the memory estimate made before the first step (training then starts even where it says "
             "the run will not fit)")
    add("--attn_dropout", default=None, type=float, help="default: the configuration's, else 0.1")
    add("--proj_dropout", default=None, type=float, help="default: the configuration's, else 0.1")
    add("--label_drop_prob", default=None, type=float,
        help="class-label dropout for classifier-free guidance; default: the configuration's, else 0.1")
    add("--r_weight", default=None, type=float,
        help="loss weight of the first (red) channel in the pixel head; default: the configuration's, else 5.0")

    # optimiser
    add("--lr", default=None, type=float, help="absolute lr; default blr x effective batch / 256")
    add("--blr", default=5e-5, type=float, help="base lr: lr = blr x (batch_size x processes) / 256")
    add("--min_lr", default=0.0, type=float, help="final lr of the cosine schedule")
    add("--lr_schedule", default="cosine", choices=("cosine", "constant"))
    add("--warmup_epochs", default=40, type=int)
    add("--weight_decay", default=0.05, type=float, help="AdamW weight decay (not on biases and 1-D params)")
    add("--grad_clip", default=3.0, type=float, help="max gradient norm; 0 disables clipping")
    add("--ema_rate", default=None, type=float,
        help="keep an exponential moving average (EMA) of the weights, updated after every optimizer step with "
             "this decay (MAR uses 0.9999); stored as model_ema in the checkpoint, evaluated instead of the raw "
             "weights. Costs one fp32 copy of the parameters. Resuming a run with an EMA keeps it at its rate "
             "(default: off, as the official recipe)")
    add("--no_ema", action="store_true",
        help="evaluate the raw weights even when the checkpoint holds EMA weights (--evaluate_nll, --evaluate_gen, "
             "--online_eval)")

    # generation / evaluation
    add("--class_num", default=None, type=int, help="default: from the checkpoint, else the dataset, else 1000")
    # sampling settings: unset ones are the checkpoint's (--evaluate_gen, --online_eval: stored
    # by a sweep or the quick start, else the training run's flags, else neutral cfg 1 /
    # temperature 1, else the model's defaults) -- models.sampling, docs/sampling.md
    unset = "default: the checkpoint's sampling settings (docs/sampling.md)"
    add("--num_iter_list", default=None, type=str, help=f"iterations per generator level, e.g. 64,16; {unset}")
    add("--cfg", default=None, type=float, help=f"classifier-free guidance scale; {unset}")
    add("--cfg_schedule", default=None, choices=("linear", "constant"), help=unset)
    add("--temperature", default=None, type=float, help=f"multiplies the logits; {unset}")
    add("--filter_threshold", default=None, type=float, help=unset)
    add("--gen_bsz", default=1024, type=int, help="generation batch size per process")
    add("--num_images", default=50000, type=int, help="images to generate (a multiple of class_num)")
    add("--eval_freq", default=40, type=int, help="online FID every N epochs")
    add("--save_last_freq", default=5, type=int, help="write checkpoint-last.pth every N epochs")
    # long runs: step-level checkpoints, preemption, stalls (docs/training.md)
    add("--save_every_steps", default=0, type=int,
        help="also checkpoint every N training steps (counted from the start of training; 0: off)")
    add("--save_every_min", default=0.0, type=float,
        help="also checkpoint when M minutes of wall clock have passed since the last checkpoint (0: off)")
    add("--save_thread", default=None, action="store_true",
        help="write checkpoints from a background thread: training stalls only for a CPU copy of the state "
             "(the default on CUDA; docs/training.md)")
    add("--no_save_thread", dest="save_thread", action="store_false",
        help="write checkpoints in the training loop (the default on CPU)")
    add("--allow_recipe_change", action="store_true",
        help="resume although the learning-rate recipe (lr, min_lr, schedule, warm-up, weight decay, gradient "
             "clipping) differs from the checkpoint's; without it such a resume stops with one line")
    add("--requeue_exit_code", default=0, type=int,
        help="exit code after a stop by SIGTERM / SIGUSR1 / SIGINT (the state is checkpointed); e.g. set 3 "
             "and requeue the SLURM job when srun returns 3")
    add("--dist_timeout", default=misc.DIST_TIMEOUT_MINUTES, type=float,
        help="minutes a process waits for the others in a collective before the job stops with an error")
    add("--online_eval", action="store_true", help="FID / IS during training")
    add("--evaluate_gen", action="store_true", help="generate, then FID / IS; no training")
    add("--evaluate_nll", action="store_true", help="bits/dim of the val set; no training")
    add("--nll_bsz", default=128, type=int)
    add("--nll_forward_number", default=1, type=int, help="forward passes averaged per NLL batch")
    add("--fid_stats_path", default=None,
        help="reference statistics npz (mu, sigma); default fid_stats/adm_in{img_size}_stats.npz")
    add("--inception_weights", default=None, help="local Inception weights (default: torch-fidelity downloads)")
    add("--prc_ref_dir", default=None, help="folder of real images: also report precision / recall")

    # data and output
    add("--data_path", default="./data/imagenet", type=str, help="folder with train/ and val/ ImageFolders")
    add("--output_dir", default="./output_dir", help="checkpoints, generated images, log.txt")
    add("--log_dir", default=None, help="TensorBoard folder; default: --output_dir")
    add("--device", default=None, help="cpu, cuda or cuda:N; default cuda when available, else cpu")
    add("--cpu_malloc", default="keep", choices=("keep", "default"),
        help="glibc allocator policy on the CPU when run as a script: keep freed memory for reuse instead of "
             "mapping fresh pages for every large tensor (20-40%% faster CPU training and NLL here), or "
             "glibc's default")

    # distributed (filled in from torchrun / SLURM / OpenMPI environment variables)
    add("--world_size", default=1, type=int, help="number of processes (set by the launcher)")
    add("--local_rank", "--local-rank", default=-1, type=int)
    add("--dist_on_itp", action="store_true")
    add("--dist_url", default="env://", help="rendezvous URL for init_process_group")
    return parser


# ---------------------------------------------------------------------- checks and set-up
def check_args(args):
    """Cheap checks of the flags alone (util.validation: every number in its range, the
    device), before the process group starts and anything is read or written."""
    if args.num_workers is None:
        args.num_workers = cli.default_num_workers()
    validation.check_main_flags(args)
    if args.ema_rate is not None:
        args.ema_rate = validation.ema_rate("--ema_rate", args.ema_rate)


def resolve_config(args, ckpt, path):
    """The configuration record to build without --model: the resumed checkpoint's own
    (main_fractalgen.py stores it, so the JSON file it came from may be gone; an official
    file names its model in its args or folder), else DEFAULT_MODEL's. Sets args.model."""
    if ckpt is not None:
        record, name = checkpoint_config(ckpt, path)
        args.model = getattr(ckpt.get("args"), "model", None) or name
        print0(f"model: the configuration stored in {path} ({name})" if ckpt.get(CONFIG) is not None else
               f"model: {args.model} (named by {path})")
        return record
    args.model = DEFAULT_MODEL
    return validation.check_model(args.model)


def model_kwargs(args, record):
    """FractalGen keywords given by flags (overriding the record's) and the official recipe's
    training values where neither sets them; the values used are written back to args."""
    kwargs = {k: v for k, v in TRAINING_DEFAULTS.items() if k not in record}
    kwargs.update({k: getattr(args, k) for k in TRAINING_DEFAULTS if getattr(args, k) is not None})
    kwargs["class_num"] = args.class_num or 1
    # given explicitly, these override the record's architecture entries
    for name in ("num_conds", "guiding_pixel", "grad_checkpointing"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    for name in TRAINING_DEFAULTS:
        setattr(args, name, kwargs.get(name, record.get(name)))
    return kwargs


def build_model(args, record=None):
    """The model of `record` (default: --model's) with the flags' keywords."""
    if record is None:
        record = validation.check_model(args.model or DEFAULT_MODEL)
    try:
        model = create_model(record, **model_kwargs(args, record))
    except ValueError as e:
        raise UserInputError(f"cannot build --model {args.model}: {e}") from None
    model.model_name = config_name(args.model)
    return model


def models_for_size(size):
    """Names of the models for images of at most `size` pixels (largest first)."""
    sizes = {name: record["img_size_list"][0] for name, record in CONFIGS.items()}
    return sorted((name for name in CONFIGS if sizes[name] <= size), key=lambda name: -sizes[name])


def check_before_training(model, dataset, args, device):
    """Before anything is written: warn when the images would be upscaled; stop every rank
    when the memory estimate says training cannot fit (any rank's estimate)."""
    if misc.is_main_process():
        warning = data_util.upscaling_warning(dataset, args.img_size, suggest=models_for_size)
        if warning:
            print0(warning)
    error = None
    try:
        memory.check_training_memory(model, args, device)
    except UserInputError as e:
        error = e
    if misc.all_reduce_sum([float(error is not None)], device)[0]:
        raise error or UserInputError("another process's memory estimate says training cannot fit; its message "
                                      "says by how much")


def resolve_lr(args):
    """args.lr: --lr, else --blr x effective batch / 256 (the official rule); checked with
    --weight_decay before anything is read or written."""
    eff_batch = args.batch_size * misc.get_world_size()
    origin = "--lr"
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
        origin = f"--blr {args.blr:g} x effective batch {eff_batch} / 256"
    validation.check_learning_rate(args.lr, args.weight_decay, origin)


def check_img_size(args, record=None):
    """--img_size must be the model's; without it, take the model's. The model is probed on
    the meta device (no memory, no time) and returned (its channels and normalisation
    shape the data)."""
    with torch.device("meta"):
        probe = build_model(args, record)
    native = probe.img_size
    if args.img_size is None:
        args.img_size = native
    elif args.img_size != native:
        raise UserInputError(f"--img_size {args.img_size} does not match --model {args.model}, which models "
                             f"{native}x{native} images; pass --img_size {native} or pick a model of that size")
    return probe


def find_resume_checkpoint(args, training):
    """Path of the checkpoint to load, or None to start from scratch.

    Training with --resume equal to --output_dir (the official command lines) starts fresh
    when no checkpoint exists yet -- said out loud, never silently. Any other --resume
    without a checkpoint, and evaluation without --resume, is an error."""
    if not args.resume:
        if not training:
            raise UserInputError("evaluation needs weights: pass --resume with the folder that holds "
                                 f"{ckpt_util.CHECKPOINT_NAME} (e.g. pretrained_models/{args.model or DEFAULT_MODEL})")
        return None
    path = ckpt_util.checkpoint_path(args.resume)
    if os.path.isfile(path) or ckpt_util.previous_path(path):  # load_latest_checkpoint picks
        return path
    same_as_output = os.path.abspath(args.resume) == os.path.abspath(args.output_dir)
    if training and same_as_output:
        print0(f"no {ckpt_util.CHECKPOINT_NAME} in {args.resume} yet: training from scratch")
        return None
    raise UserInputError(f"--resume {args.resume}: no {ckpt_util.CHECKPOINT_NAME} there; point --resume at the "
                         f"folder that holds it (for a fresh run, drop --resume or set it to --output_dir)")


def resolve_class_num(args, dataset, ckpt, training):
    """--class_num, else the checkpoint's, else the dataset's, else ImageNet's 1000;
    checked against the class folders when training (labels must index the embedding)."""
    data_classes = len(dataset.classes) if dataset is not None else None
    ckpt_classes = ckpt_util.checkpoint_class_num(ckpt) if ckpt is not None else None
    if args.class_num is None:
        args.class_num = ckpt_classes or data_classes or 1000
    if dataset is None:
        return
    where = dataset.root
    if training and data_classes != args.class_num:
        source = "the checkpoint" if ckpt_classes == args.class_num else "--class_num"
        held = ("holds images without class folders (one class)" if getattr(dataset, "unlabelled", False)
                else f"has {data_classes} class folders")
        raise UserInputError(f"{where} {held} but {source} says {args.class_num} "
                             f"classes; make them agree (drop --class_num to take it from the data)")
    if data_classes > args.class_num:
        raise UserInputError(f"{where} has {data_classes} class folders, more than the model's "
                             f"{args.class_num} classes; pass --class_num {data_classes} or use a model "
                             f"trained with as many classes")


def check_generation(args, model):
    """Generation and FID settings, validated before the model is built, any image is
    generated or anything is written. `model` may live on the meta device. The FID inputs
    are loaded, not just looked for: a bad file must not surface after 50k images."""
    fid.rgb_view(model.in_channels)  # PNGs and FID exist for 1 to 4 channels
    validation.check_num_images(args.num_images, args.class_num)
    levels = model.num_fractal_levels - 1
    if args.num_iter_list is not None and len(args.num_iter_list) != levels:
        raise UserInputError(f"--num_iter_list {','.join(map(str, args.num_iter_list))} has "
                             f"{len(args.num_iter_list)} entries but --model {args.model} has {levels} "
                             f"generator levels; give one per level")
    args.fid_stats_path = args.fid_stats_path or fid.default_stats_path(args.img_size)
    fid.load_stats(args.fid_stats_path)
    if args.inception_weights is None:  # a download into the cache: once, by rank 0
        misc.rank0_first(fid.inception_weights_file, "download the Inception weights", torch.device(args.device))
    fid.check_inception_weights(args.inception_weights)
    if args.prc_ref_dir is not None:
        fid.check_prc_ref_dir(args.prc_ref_dir, args.num_images)


def claim_output_dir(args, device):
    """Rank 0 claims --output_dir (util.claim: one writer per folder) before anything is
    read or written there; a refusal stops every rank. Returns the Claim (None elsewhere)."""
    held = []

    def take():
        held.append(claim.claim(args.output_dir))
        if held[0].took_over:
            print0(f"{args.output_dir} was claimed by a run that ended without giving it up "
                   f"({held[0].took_over}); taking it over")
    misc.rank0_first(take, "claim --output_dir", device, then_others=False)
    return held[0] if held else None


def load_model_state(model, ckpt, path, args, training):
    """The checkpoint's weights into `model`: evaluation takes its EMA weights (model_ema)
    when it has them, unless --no_ema; training takes the raw ones (its EMA is kept apart,
    see start_ema). Sets model.weights to "ema" or "raw"."""
    use_ema = not training and EMA_KEY in ckpt and not args.no_ema
    try:
        model.load_state_dict(ckpt[EMA_KEY if use_ema else "model"])
    except CheckpointMismatchError as e:
        raise mismatch_error(e, ckpt, path, args) from None
    model.weights = "ema" if use_ema else "raw"
    model.checkpoint_path = path
    if not training and EMA_KEY in ckpt:
        print0(f"evaluating the EMA weights of {path} (--no_ema: the raw ones)" if use_ema
               else f"evaluating the raw weights of {path} (--no_ema), not its EMA weights")


def set_sampling(model, ckpt, path, record, args, training):
    """The sampling settings generation takes where the flags leave them unset
    (models.sampling), the same for --evaluate_gen and --online_eval: the checkpoint's
    (stored by a sweep or the quick start, else the training run's flags, else neutral
    cfg 1 / temperature 1, else the model's defaults); a run from scratch: neutral ones
    below its own flags. Said in one line; --evaluate_gen adds one when a sweep would
    pick better ones."""
    given = sampling_flags(args)
    if ckpt is not None:
        model.sampling_defaults, model.sampling_sources = checkpoint_sampling(ckpt, path, record, model.model_name,
                                                                              args.model)
    else:
        model.sampling_defaults, model.sampling_sources = provenance.resolve(provenance.layers(
            record.get(SAMPLING), model.model_name, trained=True, user_record=is_config_file(args.model)))
    print0(f"{'online evaluation samples' if training else 'sampling'} with {model.describe_sampling(**given)}")
    note = None if training else model.sampling_note(**given)
    if note:
        print0(note)


def carried_sampling(ckpt, path, levels):
    """The sampling settings a checkpoint stores that training carries into its own saves:
    ('sampling', 'sampling_source') as stored (a sweep's source names the epoch and step it
    measured), checked; None when it stores none, or only a one-class model's cfg 1, which
    every save writes anew."""
    settings, source = stored_sampling(ckpt, path, levels)
    if settings is None or source.get("by") == provenance.BY_ONE_CLASS:
        return None
    source.pop("earlier_weights", None)  # worked out when loading, against the checkpoint's own position
    return ckpt[SAMPLING], source


def start_ema(model, ckpt, path, args):
    """The EMA of the weights (--ema_rate), continued from the checkpoint's model_ema when it
    has one; None when there is none to keep. Resuming an EMA run without --ema_rate keeps
    its EMA at the checkpoint's rate; a different --ema_rate, or a checkpoint without EMA
    weights, is said in one line."""
    stored = ckpt.get(EMA_KEY) if ckpt is not None else None
    stored_rate = getattr(ckpt.get("args"), "ema_rate", None) if stored is not None else None
    if args.ema_rate is None:
        if stored is None:
            return None
        if stored_rate is None:
            raise UserInputError(f"{path} holds EMA weights but not their rate; pass --ema_rate to keep them up "
                                 f"to date")
        args.ema_rate = validation.ema_rate(f"{path}: ema_rate", stored_rate)
        print0(f"{path} holds EMA weights: keeping them up to date at its rate {args.ema_rate:g} "
               f"(--ema_rate sets another)")
    ema = EMA(model, args.ema_rate)
    if stored is None:
        if ckpt is not None:
            print0(f"{path} has no EMA weights: the EMA (--ema_rate {args.ema_rate:g}) starts from its weights")
        return ema
    try:
        ema.load_state_dict(stored)
    except CheckpointMismatchError as e:
        raise UserInputError(f"the EMA weights (model_ema) in {path} do not fit --model {args.model}: {e}") from None
    if stored_rate is not None and stored_rate != args.ema_rate:
        print0(f"--ema_rate {args.ema_rate:g} replaces the rate {stored_rate:g} of {path}: its EMA weights go on "
               f"from here at the new rate")
    return ema


def mismatch_error(e, ckpt, path, args):
    trained = ckpt_util.checkpoint_model_name(ckpt)
    if trained and trained != args.model:  # that says it all
        return UserInputError(f"{path} does not fit --model {args.model}: it was saved by --model {trained}")
    return UserInputError(f"{path} does not fit --model {args.model}: {e}")


def check_fits_model(args, record):
    """load_latest_checkpoint's check: the checkpoint holds weights of --model's `record`
    (compared on the meta device, so another model's checkpoint-last.pth falls back to
    checkpoint-prev.pth). None without --model: the checkpoint then says what it holds."""
    if record is None:
        return None

    def check(ckpt, path):
        kwargs = dict(model_kwargs(args, record),
                      class_num=args.class_num or ckpt_util.checkpoint_class_num(ckpt) or 1)
        try:
            with torch.device("meta"):
                check_state_dict(create_model(record, **kwargs), ckpt["model"])
        except CheckpointMismatchError as e:
            raise mismatch_error(e, ckpt, path, args) from None
        except ValueError:  # a keyword the factory rejects: build_model says so later
            return
    return check


def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases and 1-D parameters (norms, scalars);
    [no-decay, decay] in that order, as in the official optimizer state."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def resume_position(ckpt, args):
    """Where training continues: {'epoch', 'step', 'meters', 'log_entry', 'steps_per_epoch'}.
    Our checkpoints say it in 'train_state' (mid-epoch ones too); an official file only
    has 'epoch' (done), and a weights-only file none (start at --start_epoch)."""
    position = {"epoch": args.start_epoch, "step": 0, "meters": None, "log_entry": None, "steps_per_epoch": None}
    if ckpt is None or "epoch" not in ckpt:
        return position
    position.update(epoch=int(ckpt["epoch"]) + 1)
    position.update(ckpt.get("train_state") or {})
    return position


def restore_training_state(ckpt, path, optimizer, scaler, args, steps_per_epoch):
    """Optimizer, scaler and position from a full checkpoint; a weights-only checkpoint (e.g.
    an official pretrained model) fine-tunes from args.start_epoch with a fresh optimizer.
    Returns the resume_position; sets args.start_epoch."""
    position = resume_position(ckpt, args)
    if ckpt is None:
        return position
    if "optimizer" not in ckpt or "epoch" not in ckpt:
        print0(f"{path} holds weights only: fresh optimizer, starting at epoch {args.start_epoch}")
        return position
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as e:
        raise UserInputError(f"the optimizer state in {path} does not fit this model's parameters ({e})") from None
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    args.start_epoch = position["epoch"]
    where = f"step {position['step']} of epoch {position['epoch']}" if position["step"] else f"epoch {args.start_epoch}"
    done = f"epoch {ckpt['epoch']} done" if ckpt["epoch"] >= 0 else "in its first epoch"
    print0(f"resumed {path}: {done}, continuing at {where}")
    return position


# what the learning rate at each step depends on: a resume that changes one of these
# trains on with another recipe than the run it continues
RECIPE_FLAGS = ("lr", "min_lr", "lr_schedule", "warmup_epochs", "weight_decay", "grad_clip")


def check_resume_changes(ckpt, path, args, num_train_images, steps_per_epoch):
    """Compare this run with the one that wrote `ckpt` (its args and train_state), before
    anything is written. Another data order (--seed, the number of training images, the
    batch layout) is said in one line; a checkpoint in the middle of an epoch then resumes
    at the start of that epoch (the rest of the old order is not defined), by setting its
    position to step 0. Another learning-rate recipe stops the run with one line, unless
    --allow_recipe_change (then it is said); a learning rate that follows the effective
    batch from the same --blr is said. Another --epochs (cosine schedule) is said."""
    saved, state = checkpoint_args(ckpt), dict(ckpt.get("train_state") or {})
    if "optimizer" not in ckpt or "epoch" not in ckpt:  # weights only: a fresh start, nothing continues
        return
    order = _changes([("--seed", saved.get("seed"), args.seed),
                      ("training images", state.get("num_train_images"), num_train_images),
                      ("--batch_size", state.get("batch_size", saved.get("batch_size")), args.batch_size),
                      ("processes", state.get("world_size", saved.get("world_size")), misc.get_world_size()),
                      ("steps per epoch", state.get("steps_per_epoch"), steps_per_epoch)])
    old_layout = (state.get("batch_size", saved.get("batch_size")), state.get("world_size", saved.get("world_size")))
    follows = _lr_follows_batch(saved, args, *old_layout)
    recipe = _changes([(("" if name == "lr" else "--") + name, saved.get(name), getattr(args, name))
                       for name in RECIPE_FLAGS if not (follows and name == "lr")])
    if recipe and not args.allow_recipe_change:
        raise UserInputError(f"{path} was trained with another recipe ({', '.join(recipe)}): resuming would train "
                             f"on with other learning rates than the run it continues; rerun with its values, or "
                             f"pass --allow_recipe_change to go on with the new ones")
    if recipe:
        print0(f"warning: training on from {path} with another recipe: {', '.join(recipe)}")
    lr = _changes([("lr", saved.get("lr"), args.lr)]) if follows else []
    if lr:
        print0(f"note: the learning rate follows the effective batch (--blr {args.blr:g} x "
               f"{args.batch_size * misc.get_world_size()} / 256): {lr[0]}")
    epochs = _changes([("--epochs", saved.get("epochs"), args.epochs)])
    if epochs and args.lr_schedule == "cosine":
        print0(f"note: {epochs[0]} stretches the cosine learning-rate schedule of {path} from here on")
    if not order:
        return
    position = resume_position(ckpt, args)
    if position["step"]:
        print0(f"warning: {path} stopped after step {position['step']} of epoch {position['epoch']}, but the data "
               f"order differs now ({', '.join(order)}), so the rest of that epoch is not defined; restarting epoch "
               f"{position['epoch']} from its first step")
        ckpt["train_state"] = dict(state, step=0, meters=None)
    else:
        print0(f"note: the data order differs from the run {path} continues ({', '.join(order)}), from epoch "
               f"{position['epoch']} on")


def _lr_follows_batch(saved, args, old_batch, old_world):
    """Whether both runs take the learning rate from the same --blr by the official rule
    (--blr x effective batch / 256), so that another learning rate comes only from another
    batch layout (e.g. a job requeued on fewer GPUs), which is no change of recipe."""
    def rule(blr, batch, world):
        return blr * batch * world / 256
    try:
        return (math.isclose(saved["blr"], args.blr, rel_tol=1e-9)
                and math.isclose(saved["lr"], rule(saved["blr"], old_batch, old_world), rel_tol=1e-9)
                and math.isclose(args.lr, rule(args.blr, args.batch_size, misc.get_world_size()), rel_tol=1e-9))
    except (KeyError, TypeError):  # an official checkpoint's args may lack them
        return False


def _changes(pairs):
    """'name old -> new' for each (name, old, new) that differs (None: unknown, skipped)."""
    def differs(old, new):
        if isinstance(old, float) or isinstance(new, float):
            return not math.isclose(float(old), float(new), rel_tol=1e-9)
        return old != new
    return [f"{name} {old:g} -> {new:g}" if isinstance(old, float) or isinstance(new, float) else
            f"{name} {old} -> {new}" for name, old, new in pairs
            if old is not None and new is not None and differs(old, new)]


class Checkpoints:
    """When and what the training loop checkpoints, besides the epoch ends (--save_last_freq):
    every --save_every_steps steps, when --save_every_min minutes have passed (rank 0's
    clock; its vote rides on the step's all-reduce, see train_one_epoch), and on a stop
    request. Rank 0 writes checkpoint-last.pth (the one before becomes checkpoint-prev.pth),
    one write at a time. A checkpoint is the official dict plus 'train_state': the position
    (epoch, steps done), the epoch's meter sums and the batch layout; with --ema_rate also
    'model_ema' (the EMA weights, under the keys of 'model').

    Sampling settings stored with the checkpoint ('sampling', 'sampling_source': a sweep's
    --store, the quick start's) are carried into every save, their source as stored (a
    sweep's names the epoch and step it measured, so a later load tells that training went
    on since); so are settings stored into checkpoint-last.pth while this run trains (the
    file changed since this run's last save). A one-class model without them gets cfg 1
    (no guidance). `carried`: (settings, source) of the checkpoint resumed from, or None."""

    def __init__(self, model, optimizer, scaler, args, meters=None, log_writer=None, ema=None, carried=None,
                 num_train_images=None):
        self.model, self.optimizer, self.scaler, self.args, self.ema = model, optimizer, scaler, args, ema
        self.log_writer, self.num_train_images = log_writer, num_train_images
        self.path = os.path.join(args.output_dir, ckpt_util.CHECKPOINT_NAME)
        background = args.save_thread if args.save_thread is not None else torch.device(args.device).type == "cuda"
        self.writer = ckpt_util.CheckpointWriter(background=background)
        self.writer.written = ckpt_util.file_signature(self.path)  # a change after this is a store into the file
        self.last_save = time.monotonic()
        self.resumed_meters = meters
        self.carried = carried

    def sampling_entries(self):
        """('sampling', 'sampling_source') of the next save, or None (rank 0, after the
        previous save is on disk)."""
        on_disk = ckpt_util.file_signature(self.path)
        if on_disk is not None and on_disk != self.writer.written:  # someone stored into it since
            try:
                stored = carried_sampling(ckpt_util.load_checkpoint(self.path), self.path,
                                          self.model.num_fractal_levels - 1)
            except UserInputError as e:
                print0(f"warning: {misc.one_line(e)}; its sampling settings are not carried over")
            else:
                if stored is not None and stored != self.carried:
                    print0(f"{self.path} holds sampling settings stored since the last save "
                           f"({provenance.label(stored[1])}): carried into this run's saves")
                    self.carried = stored
        if self.carried is not None:
            return self.carried
        if self.args.class_num == 1:  # one class: guidance has nothing to steer towards
            return dict(UNCONDITIONAL_SAMPLING), dict(UNCONDITIONAL_SOURCE)
        return None

    def flags(self):
        """[stop requested here, time-based save due] for the step's all-reduce."""
        minutes = self.args.save_every_min
        due = misc.is_main_process() and minutes > 0 and time.monotonic() - self.last_save >= 60 * minutes
        return [int(preempt.requested() is not None), int(due)]

    def step_due(self, epoch, step, steps):
        every = self.args.save_every_steps
        return every > 0 and (epoch * steps + step) % every == 0

    def restore_meters(self, logger):
        """Put the resumed epoch's loss / lr sums back, so its averages cover every step."""
        for name, (total, count) in (self.resumed_meters or {}).items():
            logger.meters[name].total, logger.meters[name].count = total, count
        self.resumed_meters = None

    def save(self, epoch, step, steps, meters):
        """After `step` of `steps` steps of `epoch` (all ranks call; rank 0 writes)."""
        sums = {name: [meter.total, meter.count] for name, meter in meters.items()}
        self._write(epoch - 1, dict(epoch=epoch, step=step, steps_per_epoch=steps, meters=sums),
                    f"epoch {epoch}, step {step}/{steps}")

    def save_epoch(self, epoch, steps, log_entry):
        """At the end of `epoch`; log_entry is its log.txt line, restored if the line is lost."""
        self._write(epoch, dict(epoch=epoch + 1, step=0, steps_per_epoch=steps, log_entry=log_entry),
                    f"epoch {epoch}")

    def _write(self, epoch_done, train_state, where):
        if misc.is_main_process():
            if self.log_writer is not None:  # events up to this point must survive a kill after it
                self.log_writer.flush()
            train_state.update(world_size=misc.get_world_size(), batch_size=self.args.batch_size,
                               num_train_images=self.num_train_images)
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "epoch": epoch_done, "scaler": self.scaler.state_dict(),
                     "args": argparse.Namespace(**vars(self.args)), "train_state": train_state,
                     CONFIG: self.model.config}
            if self.ema is not None:
                state[EMA_KEY] = self.ema.state_dict()
            start = time.perf_counter()
            self.writer.wait()  # the previous save is on disk: a change to the file since is someone else's
            sampling = self.sampling_entries()
            if sampling is not None:
                state[SAMPLING], state[SAMPLING_SOURCE] = sampling
            self.writer.save(state, self.path)
            print0(f"saved {self.path} ({where}; training paused {time.perf_counter() - start:.2f} s)")
        self.last_save = time.monotonic()

    def wait(self):
        self.writer.wait()


def rewind_logs(args, ckpt, steps_per_epoch):
    """Before a resumed run writes: drop log.txt lines and TensorBoard events recorded after
    the checkpoint's position (the dead run wrote them; this run writes them again)."""
    position = resume_position(ckpt, args)
    epoch, step = position["epoch"], position["step"]
    logs.rewind_log(os.path.join(args.output_dir, "log.txt"), epoch - 1, position["log_entry"])
    cut = step_axis(epoch, step, position["steps_per_epoch"] or steps_per_epoch)
    dropped = logs.rewind_tensorboard(args.log_dir or args.output_dir,
                                      lambda tag, x: x < (cut if tag in STEP_TAGS else epoch))
    if dropped:
        print0(f"dropped {dropped} TensorBoard event(s) written after the checkpoint (this run writes them again)")


def build_loaders(args, dataset_train, dataset_val):
    rank, world_size = misc.get_rank(), misc.get_world_size()
    pin = args.pin_mem and torch.device(args.device).type == "cuda"
    loaders = {}
    if dataset_train is not None:
        sampler = data_util.ResumableSampler(dataset_train, num_replicas=world_size, rank=rank,
                                             shuffle=True, seed=args.seed, drop_last=True)
        loaders["train"] = torch.utils.data.DataLoader(dataset_train, sampler=sampler, batch_size=args.batch_size,
                                                       num_workers=args.num_workers, pin_memory=pin, drop_last=True,
                                                       worker_init_fn=preempt.ignore_in_worker)
        if len(loaders["train"]) == 0:
            raise UserInputError(f"{dataset_train.root} has {len(dataset_train)} images, fewer than one step of "
                                 f"--batch_size {args.batch_size} x {world_size} process(es); lower --batch_size")
    if dataset_val is not None:
        sampler = data_util.ShardSampler(len(dataset_val), rank, world_size)
        loaders["val"] = torch.utils.data.DataLoader(dataset_val, sampler=sampler, batch_size=args.nll_bsz,
                                                     num_workers=args.num_workers, pin_memory=pin,
                                                     worker_init_fn=preempt.worker_init)
    return loaders


# ---------------------------------------------------------------------- main
def main(args):
    """Run training or evaluation. Returns {'model': the FractalGen (unwrapped), 'args',
    and 'train' / 'nll' / 'gen' results where run}; after a stop by a signal, {'args',
    'stopped': {'epoch', 'step', 'steps', 'signal', 'checkpoint'}}. Bad input raises
    SystemExit with one sentence and writes nothing."""
    held = {}  # what run() opened: closed here, also after an error
    evaluating = args.evaluate_gen or args.evaluate_nll
    preempt.install("now" if evaluating else "step")  # evaluation: a signal stops at once
    try:
        if preempt.requested():  # during the imports (script_main): nothing started yet
            return {"args": args, "stopped": report_early_stop(preempt.requested(), "during start-up")}
        check_args(args)
        device = misc.init_distributed_mode(args)
        if args.distributed:
            preempt.watch_launcher()
        result = run(args, device, held)
        if "checkpoints" in held:
            held["checkpoints"].wait()
        misc.barrier()
        return result
    except TrainingStopped as stop:
        held["checkpoints"].wait()  # the checkpoint of this point is on disk before we exit
        if stop.step is None:
            return {"args": args, "stopped": report_early_stop(stop.signal_name, "before the first training step")}
        return {"args": args, "stopped": report_stop(stop, held["checkpoints"].path, args)}
    except preempt.Terminated as stop:  # SIGTERM / SIGUSR1 in evaluation
        what = ("; complete images are kept: rerun the same command to generate only the missing ones"
                if args.evaluate_gen else "; rerun the same command to evaluate")
        print(f"rank {misc.get_rank()}: stopped by {stop.args[0]} during evaluation{what}", flush=True)
        return {"args": args, "stopped": {"signal": stop.args[0]}}
    except (UserInputError, NonFiniteLossError) as e:
        raise SystemExit(f"error: {misc.one_line(e)}") from None
    except KeyboardInterrupt:  # Ctrl-C in evaluation, or a second one in training: stop now
        print(f"rank {misc.get_rank()}: interrupted by Ctrl-C; stopped without saving (checkpoints in "
              f"{args.output_dir} are intact)", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except RuntimeError as e:
        failure = misc.collective_failure(e) if misc.is_dist() else None
        if failure is None:
            raise
        why = (f"no answer from the other processes within --dist_timeout {args.dist_timeout:g} min (one stalled or "
               f"died; see its log)" if failure == "timeout" else
               "lost the connection to another process (it died or was killed; see its log)")
        raise SystemExit(f"error: rank {misc.get_rank()}: {why}; stopping. The last checkpoint in {args.output_dir} "
                         f"is intact: resume with --resume {args.output_dir}") from None
    finally:
        close_held(held)
        misc.cleanup_distributed()
        preempt.uninstall()


def close_held(held):
    """Finish a background checkpoint write, close TensorBoard and give up the claim on
    --output_dir; an error here is reported only when nothing else went wrong first."""
    pending = sys.exc_info()[1] is not None
    first_error = None
    for name, finish in (("checkpoints", "wait"), ("log_writer", "close"), ("claim", "release")):
        if held.get(name) is None:
            continue
        try:
            getattr(held.pop(name), finish)()
        except UserInputError as e:
            first_error = first_error or e
    if first_error is not None and not pending:
        raise SystemExit(f"error: {misc.one_line(first_error)}") from None


def report_early_stop(signal_name, when):
    """One line for a stop before anything was trained or written; the details."""
    why = f"stopped by {signal_name}" if signal_name else "stopped (another process was signalled)"
    print(f"rank {misc.get_rank()}: {why} {when}; nothing was trained or saved. To go on, rerun the same command",
          flush=True)
    return {"signal": signal_name, "checkpoint": None}


def report_stop(stop, path, args):
    """One line per rank on where training stopped and how to go on; the details."""
    why = f"stopped by {stop.signal_name}" if stop.signal_name else "stopped (another process was signalled)"
    resumes = args.resume and os.path.abspath(args.resume) == os.path.abspath(args.output_dir)
    how = "run the same command again" if resumes else f"rerun with --resume {args.output_dir}"
    print(f"rank {misc.get_rank()}: {why} after step {stop.step} of {stop.steps} in epoch {stop.epoch}; "
          f"{path} holds this point. To continue, {how}", flush=True)
    return {"epoch": stop.epoch, "step": stop.step, "steps": stop.steps, "signal": stop.signal_name,
            "checkpoint": path}


def open_outputs(args, ckpt, training, steps_per_epoch):
    """Rank 0, in --output_dir (claimed, so it exists): clear temp files of killed saves, rewind
    the logs of a resumed run (--resume given), and open TensorBoard. Returns the LogWriter
    (None on other ranks)."""
    if not misc.is_main_process():
        return None
    if training:
        stale = ckpt_util.remove_stale_temp_files(args.output_dir)
        if stale:
            print0(f"removed {', '.join(stale)} from {args.output_dir} (left by a save that was killed)")
        stale = remove_stale_online_folders(args.output_dir)
        if stale:
            print0(f"removed {', '.join(stale)} from {args.output_dir} (left by an online evaluation that was killed)")
        if args.resume:  # also a fresh start in a folder a run died in before its first checkpoint
            rewind_logs(args, ckpt, steps_per_epoch)
    return logs.LogWriter(args.log_dir or args.output_dir, "--log_dir" if args.log_dir else "--output_dir")


def run(args, device, held):
    training = not (args.evaluate_gen or args.evaluate_nll)
    generating = args.evaluate_gen or (training and args.online_eval)
    if args.threads is not None:
        cli.set_threads(args.threads)
    args.precision = misc.resolve_precision(args.precision, device)
    record = validation.check_model(args.model) if args.model is not None else None
    if record is not None:
        probe = check_img_size(args, record)
    if training:
        resolve_lr(args)
    held["claim"] = claim_output_dir(args, device)

    # inputs: data folders, checkpoint, model -- all checked before anything is written
    if training:
        data_util.split_dir(args.data_path, "train")
    if args.evaluate_nll:
        data_util.split_dir(args.data_path, "val")
    path = find_resume_checkpoint(args, training)
    ckpt, path = (ckpt_util.load_latest_checkpoint(path, use_previous=training, check=check_fits_model(args, record))
                  if path else (None, None))
    if record is None:
        record = resolve_config(args, ckpt, path)
        probe = check_img_size(args, record)
    pixels = dict(channels=probe.in_channels, mean=probe.pixel_mean, std=probe.pixel_std)  # how the model reads data
    dataset_train = (data_util.build_dataset(args.data_path, "train", args.img_size, True, seed=args.seed, **pixels)
                     if training else None)
    dataset_val = (data_util.build_dataset(args.data_path, "val", args.img_size, False, **pixels)
                   if args.evaluate_nll else None)
    for dataset in (dataset_train, dataset_val):
        if getattr(dataset, "unlabelled", False):
            print0(data_util.describe_split(dataset.root))
    resolve_class_num(args, dataset_train if training else dataset_val, ckpt, training)
    if generating:
        with torch.device("meta"):  # the architecture only: no memory, no time
            architecture = build_model(args, record)
        check_generation(args, architecture)
    misc.seed_everything(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(args, record)
    if ckpt is not None:
        load_model_state(model, ckpt, path, args, training)
    if generating:
        set_sampling(model, ckpt, path, record, args, training)
    model.to(device)
    if args.compile:
        # the blocks, not the whole model: the recursion's masks have data-dependent shapes
        # (and inductor's CPU code generation fails on the whole model in torch 2.14)
        model.compile_blocks()
    loaders = build_loaders(args, dataset_train, dataset_val)

    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    classes = f"{args.class_num} classes" if args.class_num > 1 else "1 class (unconditional)"
    print0(f"model {model.model_name}: {n_params / 1e6:.2f}M trainable parameters, {args.img_size}x{args.img_size}, "
           f"{classes}; device {device}, precision {args.precision}, "
           f"{misc.get_world_size()} process(es)")
    if training:
        check_before_training(model, dataset_train, args, device)
    notice = cli.fast_notice(validation.fast_sampler(args.fast_sampling), model) if generating else None
    if notice:
        print0(notice)
    steps_per_epoch = len(loaders["train"]) if training else None
    if training and ckpt is not None:
        check_resume_changes(ckpt, path, args, len(dataset_train), steps_per_epoch)
    log_writer = held["log_writer"] = open_outputs(args, ckpt, training, steps_per_epoch)
    if log_writer is None:
        held.pop("log_writer")
    result = {"model": model, "args": args}

    if not training:
        model.eval()
        if args.evaluate_nll:
            result["nll"] = evaluate_nll(model, loaders["val"], args, log_writer=log_writer)
        if args.evaluate_gen:
            result["gen"] = evaluate_gen(model, args, log_writer=log_writer, weights=ckpt_util.fingerprint(path))
        return result

    ema = start_ema(model, ckpt, path, args)
    result["train"] = train(model, ckpt, path, loaders["train"], args, device, log_writer, held, ema)
    if ema is not None:
        result[EMA_KEY] = ema.state_dict()
    return result


def train(model, ckpt, path, loader, args, device, log_writer, held, ema=None):
    """The training loop; returns the last epoch's stats. `ema` (util.ema.EMA, or None) is
    updated after every step and checkpointed. Raises TrainingStopped after a stop request,
    once its checkpoint is written."""
    world_size = misc.get_world_size()
    eff_batch = args.batch_size * world_size
    print0(f"effective batch {eff_batch}; base lr {args.lr * 256 / eff_batch:.2e}, actual lr {args.lr:.2e}")
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    steps = len(loader)
    position = restore_training_state(ckpt, path, optimizer, scaler, args, steps)
    carried = carried_sampling(ckpt, path, model.num_fractal_levels - 1) if ckpt is not None else None
    del ckpt
    checkpoints = held["checkpoints"] = Checkpoints(model, optimizer, scaler, args, position["meters"],
                                                         log_writer, ema, carried, num_train_images=len(loader.dataset))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    train_model = model
    if args.distributed:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    stats = {}
    if args.start_epoch >= args.epochs:
        print0(f"nothing to train: epoch {args.start_epoch} is past --epochs {args.epochs}")
        return stats
    print0(f"training epochs {args.start_epoch}..{args.epochs - 1}, {steps} steps each")
    # a stop asked for during the start-up (any rank): before the first step, nothing to save
    if misc.all_reduce_sum([float(preempt.requested() is not None)], device)[0]:
        raise TrainingStopped(args.start_epoch, None, steps, preempt.requested())
    start = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        start_step = position["step"] if epoch == args.start_epoch else 0
        loader.sampler.set_epoch(epoch, skip=start_step * args.batch_size)
        stats = train_one_epoch(train_model, loader, optimizer, scaler, epoch, args, log_writer,
                                start_step=start_step, checkpoints=checkpoints, ema=ema)
        last = epoch + 1 == args.epochs
        if epoch % args.save_last_freq == 0 or last:
            checkpoints.save_epoch(epoch, steps, {"epoch": epoch, **stats})
        if args.online_eval and (epoch % args.eval_freq == 0 or last):
            with ema.applied() if ema is not None and not args.no_ema else contextlib.nullcontext():
                scores = evaluate_gen(model, args, epoch, log_writer, online=True)
            stats.update({k: v for k, v in scores.items() if k != "folder"})
        if misc.is_main_process():
            logs.append_line(os.path.join(args.output_dir, "log.txt"), {"epoch": epoch, **stats})
            done = epoch + 1 - args.start_epoch
            remaining = (time.time() - start) / done * (args.epochs - epoch - 1)
            print0(f"epoch {epoch} done; run ETA {misc.format_seconds(remaining)}")
    print0(f"training time {datetime.timedelta(seconds=int(time.time() - start))}")
    return stats


def script_main(argv=None):
    """Command-line entry: process-wide settings (the CPU allocator policy), then main."""
    args = get_args_parser().parse_args(argv)
    on_cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    if on_cpu and args.cpu_malloc == "keep":
        misc.keep_freed_memory()
    result = main(args)
    if isinstance(result, dict) and "stopped" in result:
        sys.exit(args.requeue_exit_code)
    return result


if __name__ == "__main__":
    script_main()
