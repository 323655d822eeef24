"""Speed of FractalGen: training, NLL evaluation and sampling, with a per-level breakdown.

    python -m util.benchmark                                  # bench64 and bench64ar on CPU
    python -m util.benchmark --configs bench64 --threads 2 --json bench.json
    python -m util.benchmark --device cuda                    # adds every official configuration
    python -m util.benchmark --precision fp32 bf16 --compile off on   # opt-in rows
    python -m util.benchmark --phases sample --sample_batch 1 4 --fast off on frozen   # the fast sampler
    python -m util.benchmark --configs bench64 --phases train --ema_rate 0.9999   # the cost of --ema_rate

Models get random weights (or --checkpoint), inputs are random images and labels, and
every number comes after warm-up:
- train: images/s of forward + backward + grad clip + AdamW, median over --steps steps;
- eval:  images/s of the eval-mode (NLL) forward under inference_mode, total images over
         total time (MAR levels draw a random mask count per forward, so the cost of one
         forward varies; the seed fixes the sequence);
- sample: seconds per image of `model.generate` (CFG, linear schedule), split into the
         time spent inside each level's generator excluding its children, and the pixel head;
         one row per --sample_batch and --fast choice; fast rows also report the first
         call (compilation included: cold) before the timed (warm) one;
- peak memory of each phase (CUDA: max allocated; CPU: the process's peak resident set);
- FLOPs per image of each phase and level (torch.utils.flop_counter formulas, causal
  attention counted in full) and, divided by the time, the fraction of this machine's
  measured fp32 (or bf16) matmul rate that the phase reaches.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import platform
import statistics
import time
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from models import CONFIGS, DEFAULT_SAMPLING, MAR, CheckpointMismatchError, create_model, fixed_masking
from models.config import is_config_file
from util import cli
from util.checkpoint import load_checkpoint
from util.misc import UserInputError, autocast, keep_freed_memory, one_line, synchronize
from util.ema import EMA
from util.validation import FAST_SAMPLERS, check_device, check_model, ema_rate, finite_nonnegative, positive_int

# Reference configurations of the performance issue (configuration records, like
# models.CONFIGS): the 64x64 architecture scaled down so that CPU runs take seconds.
BENCH_CONFIGS = {
    "bench64": dict(img_size_list=(64, 4, 1), embed_dim_list=(256, 128, 64), num_blocks_list=(4, 2, 1),
                    num_heads_list=(4, 4, 2), generator_type_list=("mar", "mar", "ar"), num_conds=5,
                    class_num=1000),
    "bench64ar": dict(img_size_list=(64, 4, 1), embed_dim_list=(256, 128, 64), num_blocks_list=(4, 2, 1),
                      num_heads_list=(4, 4, 2), generator_type_list=("ar", "ar", "ar"), num_conds=5,
                      class_num=1000),
    # seconds on CPU: for smoke tests of this tool
    "tiny": dict(img_size_list=(8, 4, 1), embed_dim_list=(32, 16, 16), num_blocks_list=(1, 1, 1),
                 num_heads_list=(2, 2, 2), generator_type_list=("mar", "mar", "ar"), num_conds=5,
                 class_num=10),
}
BENCH_SAMPLING = dict(num_iter_list=(16, 4), cfg=2.0, cfg_schedule="linear", temperature=1.0,
                      filter_threshold=1e-4)
OFFICIAL = ["fractalar_in64", "fractalmar_in64", "fractalmar_base_in256", "fractalmar_large_in256",
            "fractalmar_huge_in256"]
DEFAULT_BATCH = {"cpu": dict(train=8, eval=16, sample=4), "cuda": dict(train=32, eval=64, sample=64)}
FAST_ROWS = {**FAST_SAMPLERS, "on": True}  # --fast choice -> generate(fast=...); "on" is "compiled"
FAST_LABELS = {False: "no", True: "yes", "frozen": "frz"}  # the table's fast column
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}  # rows of the table (fp16 autocast: CUDA only)


# ---------------------------------------------------------------------- model and data
def check_config_name(name):
    """A --configs entry: a name of BENCH_CONFIGS or models.CONFIGS, or a JSON configuration file."""
    if name in BENCH_CONFIGS:
        return
    if name not in CONFIGS and not is_config_file(name):
        raise UserInputError(f"unknown config {name!r}; choose from {', '.join([*BENCH_CONFIGS, *CONFIGS])} "
                             f"or pass a JSON configuration file")
    check_model(name, flag="--configs")


def build_model(name, device, checkpoint=None):
    """A configuration (a name of BENCH_CONFIGS or models.CONFIGS, or a JSON file) with
    random weights, or the weights of `checkpoint` (a checkpoint file with a 'model' entry,
    official or ours, read with weights_only=True by util.checkpoint)."""
    check_config_name(name)
    model = create_model(BENCH_CONFIGS.get(name, name))
    if checkpoint:
        state = load_checkpoint(checkpoint)["model"]
        try:
            model.load_state_dict(state)
        except CheckpointMismatchError as e:
            raise UserInputError(f"--checkpoint {checkpoint} does not fit --configs {name}: {one_line(e)}") from None
    return model.to(device)


def sampling_settings(name, num_iter=None, cfg=None, model=None):
    """The official settings of an official configuration, the record's own of a JSON file
    that has them, else BENCH_SAMPLING (with the model's default iterations when its
    level count differs)."""
    record_sampling = getattr(model, "record_sampling", None) if is_config_file(name) else None
    if name in OFFICIAL:
        settings = dict(DEFAULT_SAMPLING[name])
    elif record_sampling:
        settings = {**BENCH_SAMPLING, **record_sampling}
    else:
        settings = dict(BENCH_SAMPLING)
    if model is not None and len(settings["num_iter_list"]) != model.num_fractal_levels - 1:
        settings["num_iter_list"] = model.default_num_iter_list()
    settings["num_iter_list"] = tuple(settings["num_iter_list"])
    if num_iter is not None:
        settings["num_iter_list"] = tuple(num_iter)
    if cfg is not None:
        settings["cfg"] = cfg
    return settings


def random_batch(model, batch, device, generator):
    """Valid random images (normalised as the model reads them, on the 1/255 grid) and labels."""
    size = model.img_size
    u8 = torch.randint(0, 256, (batch, model.in_channels, size, size), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, model.class_num, (batch,), generator=generator)
    return model.from_uint8(u8).to(device), labels.to(device)


# ---------------------------------------------------------------------- measurement helpers
class PeakMemory:
    """Peak memory of a code region: CUDA max allocated bytes, or on CPU the process's peak
    resident set (VmHWM, reset through /proc/self/clear_refs; None where unsupported)."""

    def __init__(self, device):
        self.device = device
        self.peak = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/status") as f:
                    line = next(l for l in f if l.startswith("VmHWM"))
                self.peak = int(line.split()[1]) * 1024
            except (OSError, StopIteration):
                self.peak = None
        return False


def matmul_rate(device, dtype=torch.float32, max_n=2048, reps=5, min_seconds=0.02):
    """FLOP/s of a square n x n x n matmul on this device (median of `reps`).

    n doubles from 256 up to `max_n` while one product takes under `min_seconds`: a dtype
    without hardware support (bf16 on a CPU without AVX512-BF16/AMX runs at ~1 GFLOP/s)
    is measured on a small product instead of taking minutes."""
    def median_time(n):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        times = []
        for _ in range(reps):
            synchronize(device)
            t0 = time.perf_counter()
            a @ b
            synchronize(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    n = 256
    seconds = median_time(n)
    while seconds < min_seconds and n < max_n:
        n *= 2
        seconds = median_time(n)
    return 2 * n ** 3 / seconds


# ---------------------------------------------------------------------- sections (time and FLOPs)
def _cpu_flash_forward(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _linear(x, weight, *args, out_shape=None, **kwargs):
    return 2 * math.prod(x[:-1]) * weight[0] * weight[1]


def _flop_formulas():
    """torch's FLOP formulas (matmuls, convolutions, attention) plus what its registry does
    not list: the CPU flash-attention kernels, and linear, which inference_mode dispatches
    whole instead of as a matmul."""
    from torch.utils.flop_counter import shape_wrapper
    formulas = dict(flop_registry)
    aten = torch.ops.aten
    formulas[aten.linear] = shape_wrapper(_linear)
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = shape_wrapper(_cpu_flash_forward)
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = shape_wrapper(_cpu_flash_backward)
    return formulas


class Sections:
    """Exclusive wall time, calls and FLOPs of nested named code regions.

    `with sections("L1 mar"):` inside `with sections("L0 mar"):` charges the inner time to
    L1 only. While `count_flops()` is active, every matmul/attention FLOP is charged to the
    innermost open section ("other" outside any).
    """

    def __init__(self, device=None):
        self.device = device
        self.stack = []  # [name, start, child_time]
        self.time = defaultdict(float)
        self.calls = defaultdict(int)
        self.flops = defaultdict(int)

    @contextlib.contextmanager
    def __call__(self, name):
        if self.device is not None:
            synchronize(self.device)
        frame = [name, time.perf_counter(), 0.0]
        self.stack.append(frame)
        try:
            yield
        finally:
            if self.device is not None:
                synchronize(self.device)
            elapsed = time.perf_counter() - frame[1]
            self.stack.pop()
            self.time[name] += elapsed - frame[2]
            self.calls[name] += 1
            if self.stack:
                self.stack[-1][2] += elapsed

    def current(self):
        return self.stack[-1][0] if self.stack else "other"

    def count_flops(self):
        return _FlopMode(self)


class _FlopMode(TorchDispatchMode):
    def __init__(self, sections):
        super().__init__()
        self.sections = sections
        self.formulas = _flop_formulas()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.sections.flops[self.sections.current()] += formula(*args, **kwargs, out_val=out)
        return out


def level_names(model):
    """Section names, top to bottom: 'L0 mar', 'L1 ar', ..., 'pixel head'."""
    names = [f"L{i} {type(level.generator).__name__.lower()}" for i, level in enumerate(model.levels())]
    return names + ["pixel head"]


@contextlib.contextmanager
def instrument_levels(model, sections):
    """Charge each level generator's sampling (and forward) and the pixel head to a
    section, by shadowing their `sample` / `forward` with timed wrappers on the instance
    (removed on exit; the model code is untouched)."""
    levels = list(model.levels())
    targets = [level.generator for level in levels] + [levels[-1].next_fractal]
    patched = []

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with sections(name):
                return fn(*args, **kwargs)
        return wrapper

    try:
        for name, module in zip(level_names(model), targets):
            for attr in ("sample", "forward"):
                setattr(module, attr, timed(name, getattr(module, attr)))
                patched.append((module, attr))
        yield
    finally:
        for module, attr in patched:
            delattr(module, attr)


# ---------------------------------------------------------------------- phases
def rng_state(device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(device, state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def level_flops(sections, model, count):
    """FLOPs per image of each level, and in total, from a counting pass over `count` images."""
    levels = {name: sections.flops[name] / count for name in level_names(model)}
    return sum(levels.values()) + sections.flops["other"] / count, levels


def bench_train(model, batch, steps, warmup, device, precision, generator, flops=False, ema_rate=None):
    """Median images/s of full training steps (forward, backward, grad clip, AdamW) and
    peak memory; with flops, the FLOPs per image of the first timed step (forward and
    backward, by level: forward by level, backward in 'other'). With ema_rate, every step
    also updates an EMA of the weights (util.ema, as --ema_rate): its median seconds per
    update (inside the step time) and its size are reported apart."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    imgs, labels = random_batch(model, batch, device, generator)
    ema = EMA(model, ema_rate) if ema_rate else None
    ema_times = []

    def step():
        with autocast(device, precision):
            loss = model(imgs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()
        if ema is not None:
            synchronize(device)
            t0 = time.perf_counter()
            ema.update()
            synchronize(device)
            ema_times.append(time.perf_counter() - t0)

    for _ in range(warmup):
        step()
    state = rng_state(device)
    times = []
    with PeakMemory(device) as memory:
        for _ in range(steps):
            synchronize(device)
            t0 = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    result = dict(images_per_s=batch / statistics.median(times), step_s=statistics.median(times),
                  peak_mem_bytes=memory.peak)
    if ema is not None:
        result.update(ema_rate=ema_rate, ema_update_s=statistics.median(ema_times[warmup:]),
                      ema_bytes=sum(a.numel() * a.element_size() for a in ema.averages))
    if flops:
        set_rng_state(device, state)  # the masks of the first timed step
        sections = Sections()
        with instrument_levels(model, sections), sections.count_flops(), autocast(device, precision):
            model(imgs, labels).backward()
        result["flops_per_image"], result["levels_flops_per_image"] = level_flops(sections, model, batch)
    optimizer.zero_grad(set_to_none=True)
    return result


def mask_count_design(model):
    """Eval-mode mask counts to time MAR levels at: one {level: {"orders": None, "k": k}}
    table per forward, the full factorial of floor and ceil of each level's mean count
    (L + 1) / 2. The NLL forward's cost is linear in each level's count (a level's work
    is proportional to the patches its parent hands down), so the mean time over these
    forwards is the expected time under uniformly drawn counts -- without the noise of a
    few random draws, and the same for every implementation timed this way."""
    choices = {}
    for index, level in enumerate(model.levels()):
        if isinstance(level.generator, MAR):
            L = level.generator.seq_len
            choices[index] = sorted({(L + 1) // 2, L // 2 + 1})  # {128, 129} for L = 256
    design = [{}]
    for index, counts in choices.items():
        design = [{**table, index: {"orders": None, "k": k}} for table in design for k in counts]
    return design


def bench_eval(model, batch, steps, warmup, device, precision, generator, flops=False):
    """Images/s of the eval-mode NLL forward under inference_mode: total images over total
    time of at least `steps` forwards cycling through `mask_count_design` (a MAR level's
    cost depends on its mask count); with flops, the FLOPs per image of those forwards."""
    model.eval()
    imgs, labels = random_batch(model, batch, device, generator)
    design = mask_count_design(model)
    tables = design * math.ceil(steps / len(design))

    def forwards():
        for table in tables:
            with fixed_masking(model, table):
                model(imgs, labels)

    with torch.inference_mode(), autocast(device, precision):
        for _ in range(warmup):
            model(imgs, labels)
        with PeakMemory(device) as memory:
            synchronize(device)
            t0 = time.perf_counter()
            forwards()
            synchronize(device)
            elapsed = time.perf_counter() - t0
    result = dict(images_per_s=batch * len(tables) / elapsed, peak_mem_bytes=memory.peak,
                  mask_counts=[{level: t["k"] for level, t in table.items()} for table in design])
    if flops:
        sections = Sections()
        with torch.no_grad(), instrument_levels(model, sections), sections.count_flops(), \
                autocast(device, precision):
            forwards()
        result["flops_per_image"], result["levels_flops_per_image"] = level_flops(sections, model, batch * len(tables))
    return result


def run_generate(model, batch, settings, device, precision, generator):
    labels = torch.randint(0, model.class_num, (batch,), generator=generator).to(device)
    with autocast(device, precision):
        return model.generate(labels, **settings)


def bench_sample(model, batch, settings, device, precision, generator, warmup, flops=False, fast=False):
    """Seconds per image of `generate` and the exclusive seconds per image spent in each
    level; with flops, the FLOPs per image of each level, counted on a replay. fast: the
    fast sampler, whose graphs are built per batch size: it warms up at the timed batch,
    and the first of those calls is reported as the cold time (compilation included)."""
    model.eval()
    settings = dict(settings, fast=fast)
    cold = None
    for i in range(warmup):
        synchronize(device)
        t0 = time.perf_counter()
        run_generate(model, batch if fast else 1, settings, device, precision, generator)
        synchronize(device)
        if fast and i == 0:
            cold = (time.perf_counter() - t0) / batch
    state, labels_state = rng_state(device), generator.get_state()
    sections = Sections(device if device.type == "cuda" else None)
    if device.type == "cuda":
        # timers synchronise the GPU: measure the total without them, the split with them
        with PeakMemory(device) as memory:
            synchronize(device)
            t0 = time.perf_counter()
            run_generate(model, batch, settings, device, precision, generator)
            synchronize(device)
            total = time.perf_counter() - t0
        with instrument_levels(model, sections):
            run_generate(model, batch, settings, device, precision, generator)
    else:
        with PeakMemory(device) as memory, instrument_levels(model, sections):
            t0 = time.perf_counter()
            run_generate(model, batch, settings, device, precision, generator)
            total = time.perf_counter() - t0
    levels = {name: sections.time[name] / batch for name in level_names(model)}
    levels["outside levels"] = max(total / batch - sum(levels.values()), 0.0)
    result = dict(s_per_image=total / batch, levels_s_per_image=levels, peak_mem_bytes=memory.peak,
                  calls={name: sections.calls[name] for name in level_names(model)}, batch=batch)
    if cold is not None:
        result["first_call_s_per_image"] = cold
    if flops:
        set_rng_state(device, state)
        generator.set_state(labels_state)
        sections = Sections()
        with instrument_levels(model, sections), sections.count_flops():
            run_generate(model, batch, settings, device, precision, generator)
        result["flops_per_image"], result["levels_flops_per_image"] = level_flops(sections, model, batch)
    return result


def add_peak_fractions(row, rate):
    """Achieved FLOP/s of each phase (and sampling level) as a fraction of the matmul rate."""
    for phase in ("train", "eval"):
        if "flops_per_image" in row.get(phase, {}):
            r = row[phase]
            r["achieved_flop_s"] = r["flops_per_image"] * r["images_per_s"]
            r["fraction_of_matmul_peak"] = r["achieved_flop_s"] / rate
    s = row.get("sample", {})
    if "flops_per_image" in s:
        s["achieved_flop_s"] = s["flops_per_image"] / s["s_per_image"]
        s["fraction_of_matmul_peak"] = s["achieved_flop_s"] / rate
        s["levels_fraction_of_matmul_peak"] = {
            name: s["levels_flops_per_image"][name] / seconds / rate if seconds > 0 else None
            for name, seconds in s["levels_s_per_image"].items() if name in s["levels_flops_per_image"]}


# ---------------------------------------------------------------------- driver
def benchmark_config(name, args, device, precision, compile_model, rate, fast=False, sample_batch=None,
                     phases=None):
    """One row: `phases` (default args.phases) of one configuration, precision, compile
    and fast choice; sampling at `sample_batch` (default: the device's)."""
    torch.manual_seed(args.seed)
    model = build_model(name, device, args.checkpoint)
    batch = dict(DEFAULT_BATCH[device.type])
    for phase in ("train", "eval"):
        if getattr(args, f"{phase}_batch") is not None:
            batch[phase] = getattr(args, f"{phase}_batch")
    batch["sample"] = sample_batch or batch["sample"]
    settings = sampling_settings(name, args.num_iter, args.cfg, model)
    generator = torch.Generator().manual_seed(args.seed)
    if compile_model:
        model.compile_blocks()
    row = dict(config=name, device=device.type, precision=precision, compile=compile_model, fast=fast,
               params=sum(p.numel() for p in model.parameters()), batch=batch,
               sampling={k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()})
    # FLOPs are counted on the eager model: compiling changes none
    count = args.flops and not compile_model and not fast
    phases = args.phases if phases is None else phases
    if "train" in phases:
        row["train"] = bench_train(model, batch["train"], args.steps, args.warmup, device, precision,
                                   generator, count, args.ema_rate)
    if "eval" in phases:
        row["eval"] = bench_eval(model, batch["eval"], args.steps, args.warmup, device, precision,
                                 generator, count)
    if "sample" in phases:
        warmup = args.sample_warmup
        if warmup is None:
            warmup = int(device.type == "cuda" or compile_model or bool(fast))
        row["sample"] = bench_sample(model, batch["sample"], settings, device, precision, generator,
                                     warmup, count, fast)
    add_peak_fractions(row, rate)
    return row


def row_plan(args):
    """(precision, compile, fast, sample batch, phases) of every row per configuration.
    Training and NLL evaluation do not depend on the fast sampler or the sampling batch:
    they run in the first row of each precision and compile choice only."""
    plan = []
    for precision in args.precision:
        for compile_flag in args.compile:
            first = True
            for fast_flag in args.fast:
                for sample_batch in args.sample_batch or [None]:
                    phases = [p for p in args.phases if p == "sample" or first]
                    first = False
                    if phases:
                        plan.append((precision, compile_flag == "on", FAST_ROWS[fast_flag], sample_batch, phases))
    return plan


def native_bf16(device):
    """Whether `device` computes bf16 natively: CUDA, or a CPU whose flags list
    AVX512-BF16 or AMX-BF16 (elsewhere bf16 matmuls are emulated, far slower than fp32)."""
    if device.type != "cpu":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
    except OSError:
        flags = []
    return "avx512_bf16" in flags or "amx_bf16" in flags


def machine_info(device, threads):
    info = dict(torch=torch.__version__, python=platform.python_version(), device=device.type, threads=threads)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    info["cpu_count"] = os.cpu_count()
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = os.getloadavg()[0]
    return info


def fmt_bytes(n):
    return "-" if n is None else f"{n / 2 ** 20:.0f}M"


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def format_table(report):
    """Plain-text table: one line per configuration/precision/compile, then the split of
    sampling time by level (exclusive seconds per image, GFLOP per image, fraction of the
    matmul rate) and the FLOPs per image of each phase."""
    rate = report["matmul_flop_s"]
    m = report["machine"]
    lines = [f"# {m.get('gpu') or m['cpu']}, {m['threads']} threads, torch {m['torch']}, "
             f"malloc {'keep-freed' if m.get('malloc_keep_freed') else 'default'}; matmul "
             + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rate.items())]
    header = (f"{'config':<22} {'prec':<5} {'comp':<4} {'fast':<4} {'train img/s':>11} {'mem':>6} {'%pk':>4} "
              f"{'eval img/s':>10} {'mem':>6} {'%pk':>4} {'batch':>5} {'sample s/img':>12} {'mem':>6} {'%pk':>4}")
    lines += [header, "-" * len(header)]

    def pct(d):
        f = d.get("fraction_of_matmul_peak")
        return "-" if f is None else f"{100 * f:.0f}"

    for row in report["results"]:
        t, e, s = row.get("train", {}), row.get("eval", {}), row.get("sample", {})
        lines.append(
            f"{row['config']:<22} {row['precision']:<5} {'yes' if row['compile'] else 'no':<4} "
            f"{FAST_LABELS[row.get('fast', False)]:<4} "
            f"{fmt(t.get('images_per_s'), '.2f'):>11} {fmt_bytes(t.get('peak_mem_bytes')):>6} {pct(t):>4} "
            f"{fmt(e.get('images_per_s'), '.2f'):>10} {fmt_bytes(e.get('peak_mem_bytes')):>6} {pct(e):>4} "
            f"{fmt(s.get('batch'), 'd'):>5} "
            f"{fmt(s.get('s_per_image'), '.3f'):>12} {fmt_bytes(s.get('peak_mem_bytes')):>6} {pct(s):>4}")
        if "ema_update_s" in t:
            lines.append(f"    EMA (rate {t['ema_rate']:g}): {1e3 * t['ema_update_s']:.1f} ms per training step "
                         f"({100 * t['ema_update_s'] / t['step_s']:.1f}% of the step), {fmt_bytes(t['ema_bytes'])} fp32")
        if "first_call_s_per_image" in s:
            lines.append(f"    first call (cold, compilation included): {s['first_call_s_per_image']:.3f} s/img")
        if s:
            flops = s.get("levels_flops_per_image", {})
            fractions = s.get("levels_fraction_of_matmul_peak", {})
            parts = []
            for name, seconds in s["levels_s_per_image"].items():
                extra = ""
                if name in flops:
                    extra = f" {flops[name] / 1e9:.1f} GFLOP"
                    if fractions.get(name) is not None:
                        extra += f" {100 * fractions[name]:.0f}%"
                parts.append(f"{name} {seconds:.3f}s{extra}")
            lines.append("    sampling per image: " + "; ".join(parts))
        counted = [(phase, d) for phase, d in (("train", t), ("eval", e), ("sample", s)) if "flops_per_image" in d]
        if counted:
            lines.append("    GFLOP per image: " + ", ".join(f"{phase} {d['flops_per_image'] / 1e9:.2f}"
                                                          for phase, d in counted))
    return "\n".join(lines)


def add_flag(parser, name, **kwargs):
    """--name with underscores, like every other script, plus the hyphenated spelling this
    tool used to take as a hidden alias."""
    parser.add_argument(f"--{name}", **kwargs)
    if "_" in name:
        kwargs.pop("help", None)
        kwargs.setdefault("dest", name)
        parser.add_argument(f"--{name.replace('_', '-')}", help=argparse.SUPPRESS, **kwargs)


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(p, "configs", nargs="+", default=None,
             help=f"names from {', '.join([*BENCH_CONFIGS, *CONFIGS])}, or JSON configuration files "
                  "(default: bench64 bench64ar, plus every official configuration on CUDA)")
    add_flag(p, "device", default="cpu", help="cpu, cuda or cuda:N")
    add_flag(p, "threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_flag(p, "precision", nargs="+", default=["fp32"], choices=list(PRECISIONS),
             help="one row per precision; bf16 = torch.autocast to bfloat16 (CPU: only where the CPU "
                  "has native bf16, AVX512-BF16 or AMX; skipped elsewhere)")
    add_flag(p, "compile", nargs="+", default=["off"], choices=["off", "on"],
             help="one row per choice; on = torch.compile of every transformer block")
    add_flag(p, "fast", nargs="+", default=["off"], choices=list(FAST_ROWS),
             help="one row per choice (sampling only): on (or compiled) = the fast sampler, generate(fast=True); frozen = "
                  "generate(fast='frozen'), weights frozen into the compiled graphs (CPU)")
    add_flag(p, "phases", nargs="+", default=["train", "eval", "sample"], choices=["train", "eval", "sample"])
    add_flag(p, "train_batch", type=int, default=None, help="default 8 on CPU, 32 on CUDA")
    add_flag(p, "eval_batch", type=int, default=None, help="default 16 on CPU, 64 on CUDA")
    add_flag(p, "sample_batch", type=int, nargs="+", default=None,
             help="one row per batch size (default 4 on CPU, 64 on CUDA), e.g. 1 4")
    add_flag(p, "steps", type=int, default=5, help="timed training steps / eval forwards")
    add_flag(p, "warmup", type=int, default=2, help="untimed steps before timing")
    add_flag(p, "sample_warmup", type=int, default=None,
             help="untimed generations first (default: 1 on CUDA, with compile or fast, else 0)")
    add_flag(p, "num_iter", type=int, nargs="+", default=None,
             help="sampling iterations per generator level (default: 16 4 for bench configs, "
                  "the official settings for official configurations)")
    add_flag(p, "cfg", type=float, default=None, help="guidance scale (default 2.0 / official)")
    add_flag(p, "no_flops", dest="flops", action="store_false", help="skip the FLOP count")
    add_flag(p, "checkpoint", default=None, help="load these weights (a checkpoint with a 'model' entry) "
                                                 "instead of random ones")
    add_flag(p, "seed", type=int, default=0)
    add_flag(p, "ema_rate", type=float, default=None,
             help="training steps also update an EMA of the weights (as main_fractalgen.py --ema_rate); "
                  "reports its time per step and size")
    add_flag(p, "malloc", default="keep", choices=["keep", "default"],
             help="keep (default): glibc keeps freed memory for reuse (see keep_freed_memory); "
                  "default: glibc's own policy, as in a plain python process")
    add_flag(p, "json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def check_args(args):
    """Every flag checked before any model is built; raises UserInputError."""
    device = check_device(args.device)
    for name in args.configs or []:
        check_config_name(name)
    for flag in ("threads", "train_batch", "eval_batch", "steps"):
        if getattr(args, flag) is not None:
            positive_int(f"--{flag}", getattr(args, flag))
    for flag in ("warmup", "sample_warmup"):
        if getattr(args, flag) is not None:
            positive_int(f"--{flag}", getattr(args, flag), minimum=0)
    for value in args.sample_batch or []:
        positive_int("--sample_batch", value)
    for value in args.num_iter or []:
        positive_int("--num_iter", value)
    if args.cfg is not None:
        finite_nonnegative("--cfg", args.cfg)
    if args.ema_rate is not None:
        ema_rate("--ema_rate", args.ema_rate)
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        raise UserInputError(f"--checkpoint {args.checkpoint}: no such file; pass the path of a checkpoint .pth")
    return device


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except UserInputError as e:
        raise SystemExit(one_line(e)) from None


def run(args):
    device = check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    malloc_tuned = args.malloc == "keep" and device.type == "cpu" and keep_freed_memory()
    configs = args.configs or (["bench64", "bench64ar"] + (OFFICIAL if device.type == "cuda" else []))
    if "bf16" in args.precision and not native_bf16(device):
        print("note: this CPU has no native bf16 (no avx512_bf16 or amx_bf16 in its flags): skipping the "
              "bf16 rows, which would time an emulation", flush=True)
        args.precision = [p for p in args.precision if p != "bf16"]

    if device.type == "cpu" and hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5:
        print(f"note: load average {os.getloadavg()[0]:.1f}: other processes share the CPU, "
              f"so these timings will be low and noisy", flush=True)
    rates = {p: matmul_rate(device, PRECISIONS[p]) for p in args.precision}
    report = dict(machine=dict(machine_info(device, torch.get_num_threads()), malloc_keep_freed=malloc_tuned,
                               native_bf16=native_bf16(device)),
                  matmul_flop_s=rates, results=[])
    for name in configs:
        for precision, compile_model, fast, sample_batch, phases in row_plan(args):
            row = benchmark_config(name, args, device, precision, compile_model, rates[precision], fast,
                                   sample_batch, phases)
            report["results"].append(row)
            print(format_table(dict(report, results=[row])).split("\n", 3)[-1], flush=True)
    print()
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
