"""Will training fit in memory? An estimate made before the first step.

    estimate = training_memory(model, batch_size, device, precision)   # bytes, by part
    check_training_memory(model, args, device)                          # one line, or UserInputError

Weights, gradients and AdamW's two moments take 16 bytes per parameter (fp32); autocast
keeps a low-precision copy of the weights (2 bytes per parameter), --ema_rate an fp32 moving
average (4). Activations are measured,
not guessed: one forward pass at batch 1 in training mode, counting the tensors autograd
keeps for the backward pass (MAR levels at their mean mask count), scaled by the batch size.
Backward and the optimizer step need some room on top (`HEADROOM`).
"""
import math
import os

import torch

from models import MAR, fixed_masking
from models.mar import MASK_RATIO_MEAN, MASK_RATIO_STD

from .misc import UserInputError, autocast, print0

STATE_BYTES_PER_PARAM = 16   # fp32 weights, gradients, AdamW exp_avg and exp_avg_sq
CAST_BYTES_PER_PARAM = 2     # autocast's fp16 / bf16 copy of the weights
EMA_BYTES_PER_PARAM = 4      # --ema_rate: an fp32 moving average of the weights
HEADROOM = 1.25              # backward's transient gradients and the optimizer step's temporaries
GB = 1024 ** 3
MB = 1024 ** 2


def size_text(n):
    """Bytes as '45 MB' or '12.3 GB'."""
    return f"{n / MB:.0f} MB" if n < GB else f"{n / GB:.1f} GB"


def mean_mask_ratio():
    """Mean of MAR's training mask ratio, N(MASK_RATIO_MEAN, MASK_RATIO_STD) truncated to [0, 1]."""
    def pdf(x):
        return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)

    def cdf(x):
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    a, b = (0 - MASK_RATIO_MEAN) / MASK_RATIO_STD, (1 - MASK_RATIO_MEAN) / MASK_RATIO_STD
    return MASK_RATIO_MEAN + MASK_RATIO_STD * (pdf(a) - pdf(b)) / (cdf(b) - cdf(a))


def activation_bytes_per_image(model, device, precision="fp32"):
    """Bytes autograd keeps for one training image: a forward pass at batch 1 in training
    mode, every saved tensor's storage counted once, MAR levels at their mean mask count.

    With gradient checkpointing a checkpointed block keeps only its input, and backward
    recomputes one block at a time: the pass runs without checkpointing, the bytes saved
    inside each checkpointed block are told apart, and the estimate keeps their inputs plus
    the largest block. The random state (CPU and `device`) is restored afterwards, so
    training draws what it would have drawn without this."""
    saved, block_saved, block_inputs, active = {}, {}, {}, []

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device)
        if key not in saved:
            saved[key] = storage.nbytes()
            if active:
                block_saved[active[-1]] = block_saved.get(active[-1], 0) + storage.nbytes()
        return tensor

    def enter(block, inputs):
        active.append(block)
        block_inputs[block] = block_inputs.get(block, 0) + sum(
            t.numel() * t.element_size() for t in inputs if torch.is_tensor(t))

    def leave(*_):
        active.pop()

    checkpointed = [fractal.generator for fractal in model.levels() if fractal.generator.grad_checkpointing]
    hooks = [handle for generator in checkpointed for block in generator.blocks for handle in (
        block.register_forward_pre_hook(enter), block.register_forward_hook(leave))]
    mean_counts = {level: {"k": max(1, math.ceil(mean_mask_ratio() * fractal.generator.seq_len))}
                   for level, fractal in enumerate(model.levels()) if isinstance(fractal.generator, MAR)}
    devices = [device] if device.type == "cuda" else []
    was_training = model.training
    size = model.img_size
    try:
        with torch.random.fork_rng(devices=devices), fixed_masking(model, mean_counts):
            model.train()
            for generator in checkpointed:
                generator.grad_checkpointing = False
            images = torch.randn(1, model.in_channels, size, size, device=device)
            labels = torch.zeros(1, dtype=torch.long, device=device)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast(device, precision):
                loss = model(images, labels)
            del loss
    finally:
        for handle in hooks:
            handle.remove()
        for generator in checkpointed:
            generator.grad_checkpointing = True
        model.train(was_training)
    total = sum(saved.values())
    if not block_saved:
        return total
    return total - sum(block_saved.values()) + sum(block_inputs.values()) + max(block_saved.values())


def training_memory(model, batch_size, device, precision="fp32", ema=False):
    """Estimated peak memory of training, in bytes, by part: {'state', 'activations', 'total'}."""
    params = sum(p.numel() for p in model.parameters())
    state = params * (STATE_BYTES_PER_PARAM + (CAST_BYTES_PER_PARAM if precision != "fp32" else 0)
                      + (EMA_BYTES_PER_PARAM if ema else 0))
    activations = batch_size * activation_bytes_per_image(model, device, precision)
    return {"state": state, "activations": activations, "total": int(HEADROOM * (state + activations))}


def available_memory(device):
    """Bytes free for this process's tensors: free GPU memory, or the system's available
    memory (within a container's limit); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:  # cgroup v2: a container's limit minus what it uses
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                room = int(limit) - int(f.read().strip())
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available


def fitting_batch(estimate, batch_size, available):
    """The largest batch size whose estimate fits in `available` bytes (0: none does)."""
    per_image = estimate["activations"] / batch_size
    room = available / HEADROOM - estimate["state"]
    return max(0, int(room // per_image)) if per_image > 0 else batch_size


def check_training_memory(model, args, device, processes=None):
    """Print the estimate when it fits; raise UserInputError with one sentence when it exceeds
    what this machine has (CPU: shared by this machine's processes of the job), unless
    args.no_memory_check (which skips the estimate). Call before anything is written.
    Returns the estimate (None where it was not made)."""
    available = available_memory(device)
    if available is None or args.no_memory_check:
        return None
    if processes is None:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) if device.type == "cpu" else 1
    estimate = training_memory(model, args.batch_size, device, args.precision,
                               ema=getattr(args, "ema_rate", None) is not None)
    need = estimate["total"] * processes
    share = f" for {processes} processes" if processes > 1 else ""
    if need <= available:
        print0(f"memory: training needs about {size_text(need)}{share} "
               f"({size_text(estimate['state'] * processes)} weights and optimizer state, "
               f"{size_text(estimate['activations'] * processes)} activations at --batch_size {args.batch_size}); "
               f"{size_text(available)} available on {device.type}")
        return estimate
    batch = fitting_batch(estimate, args.batch_size, available / processes)
    fix = (f"lower --batch_size (about {batch} fits)" if batch else
           "pick a smaller model or a machine with more memory (not even batch 1 fits)")
    raise UserInputError(f"training --model {args.model} at --batch_size {args.batch_size} needs about "
                         f"{size_text(need)} of memory{share}, but {size_text(available)} are available on "
                         f"{device.type}; {fix}, add --grad_checkpointing, or pass --no_memory_check to try anyway")
