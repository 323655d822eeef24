"""Per-iteration learning-rate schedule: linear warm-up, then cosine decay or constant."""
import math


def learning_rate(epoch, args):
    """lr at a fractional epoch (epoch + step / steps_per_epoch).

    Warm-up rises linearly from 0 to args.lr over args.warmup_epochs; afterwards
    "constant" keeps args.lr and "cosine" decays to args.min_lr at args.epochs."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    if args.lr_schedule == "constant":
        return args.lr
    if args.lr_schedule == "cosine":
        progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-12)
        return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    raise ValueError(f"unknown lr_schedule {args.lr_schedule!r}; choose 'cosine' or 'constant'")


def adjust_learning_rate(optimizer, epoch, args):
    """Set every parameter group's lr for this iteration (times its optional `lr_scale`)."""
    lr = learning_rate(epoch, args)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
