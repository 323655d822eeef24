"""GPU check: every CUDA path of the project in one run, and its speed against the official code.

    git clone https://github.com/LTH14/fractalgen official/fractalgen    # optional, git-ignored
    python -m util.gpu_check --out gpu_check_out                         # on a GPU machine, ~8 min
    python -m util.gpu_check --out /tmp/gpu_check --device cpu --small   # dry run on a CPU, ~30 s

Sections, each recorded as pass / fail / skipped / error with its numbers; DIR/gpu_check.json
and DIR/gpu_check.md are rewritten after every section, so an error in one section keeps
the results of the others:
- environment: torch / CUDA versions, the GPU, the fp32 and bf16 matmul rates;
- golden: the golden cases (made by the official code, --golden_dir) in fp32 (relative
  error <= --fp32_tol) and under bf16 autocast (finite, relative error <= --bf16_tol);
- train: a few training steps of every official configuration at a small batch, in bf16
  and in fp16 with the gradient scaler (finite loss, every parameter gets a gradient, peak
  memory);
- torchrun: `torchrun --nproc_per_node=1 main_fractalgen.py` trains 2 steps on a generated
  toy dataset in a 1-process group (NCCL on CUDA, gloo on the CPU);
- sample: each official configuration samples a small batch at few iterations, in bf16
  and fp32; the outputs must lie on the k/255 grid;
- timing_*: ours against the official implementation (--official_dir) on the same device,
  same random weights, same settings, alternating: FractalMAR-H sampling, fractalmar_in64
  training, fractalar_in64 single-image latency (skipped when the official code is absent);
- profile (--profile): torch.profiler's top operators of our FractalMAR-H sampling.

--small swaps the official configurations for fractalar_tiny / fractalmar_tiny and tiny
settings, so the whole check runs on a CPU in seconds (the test suite runs it that way).
--sample_kwargs '{"name": value}' passes extra keywords to our `generate()` wherever we
sample, so that a faster sampling path can be checked and timed.
"""
import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import platform
import statistics
import shutil
import subprocess
import sys
import time
import traceback
import types
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from models import DEFAULT_SAMPLING, FractalGen, create_model, fixed_masking, from_uint8, get_config, to_uint8
from util import cli
from util.benchmark import PeakMemory, Sections, instrument_levels, level_flops, matmul_rate, random_batch
from util.benchmark import machine_info as benchmark_machine_info
from util.misc import UserInputError, autocast, one_line, replacing, synchronize
from util.validation import check_device, parse_num_iter_list, positive_int

REPO = Path(__file__).resolve().parent.parent
OFFICIAL_URL = "https://github.com/LTH14/fractalgen"
GOLDEN_CASES = ("case_ar", "case_mar", "case_mar_gp")
OFFICIAL_CONFIGS = ("fractalar_in64", "fractalmar_in64", "fractalmar_base_in256", "fractalmar_large_in256",
                    "fractalmar_huge_in256")
PAPER_SAMPLING = dict(config="fractalmar_huge_in256", batch=1024, s_per_image=1.29, gpu="H100 PCIe")
GRID_TOL = 1e-4  # normalised units; one 1/255 step is 0.017 there
TINY_CFG = 4.0  # the tiny models' default cfg is 1 (no guidance): the check samples with guidance

# What each mode runs. "full" is the GPU run; "small" the CPU dry run of the same code.
PLANS = {
    "full": dict(
        train_configs=OFFICIAL_CONFIGS, train_batch=4, train_steps=3,
        torchrun_config="fractalmar_in64",
        sample_configs=OFFICIAL_CONFIGS, sample_batch=2, sample_iters=(4, 2, 2),
        huge=dict(config="fractalmar_huge_in256", num_iter_list=(8, 4, 4), first_batch=4, max_batch=1024,
                  budget_s=60.0, precision="bf16"),
        train64=dict(config="fractalmar_in64", batch=64, steps=5, warmup=2, precision="bf16"),
        latency=dict(config="fractalar_in64", precision="bf16"),
        profile_batch=4,
    ),
    "small": dict(
        train_configs=("fractalar_tiny", "fractalmar_tiny"), train_batch=2, train_steps=2,
        torchrun_config="fractalmar_tiny",
        sample_configs=("fractalar_tiny", "fractalmar_tiny"), sample_batch=2, sample_iters=(2, 2),
        huge=dict(config="fractalmar_tiny", num_iter_list=(2, 2), first_batch=1, max_batch=4,
                  budget_s=1.0, precision="bf16"),
        train64=dict(config="fractalmar_tiny", batch=4, steps=1, warmup=1, precision="bf16"),
        latency=dict(config="fractalar_tiny", precision="bf16"),
        profile_batch=1,
    ),
}


# ---------------------------------------------------------------------- report
def write_atomic(path, text):
    """Write `text` to `path` through a temporary file renamed over it: a crash mid-write
    leaves the previous version."""
    with replacing(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def status_of(rows):
    return "pass" if rows and all(row["pass"] for row in rows) else "fail"


def run_section(report, name, fn, out):
    """Run one section, record its result (or its error) and rewrite the report files."""
    print(f"[gpu_check] {name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as e:  # one broken section must not lose the others
        result = dict(status="error", error=f"{type(e).__name__}: {one_line(e)}",
                      traceback=traceback.format_exc()[-4000:])
    result["seconds"] = round(time.perf_counter() - t0, 2)
    report["sections"][name] = result
    counts = {}
    for section in report["sections"].values():
        counts[section["status"]] = counts.get(section["status"], 0) + 1
    report["summary"] = counts
    write_atomic(os.path.join(out, "gpu_check.json"), json.dumps(report, indent=2, default=str))
    write_atomic(os.path.join(out, "gpu_check.md"), markdown(report))
    print(f"[gpu_check] {name}: {result['status']} ({result['seconds']} s)"
          + (f": {result.get('error') or result.get('reason')}" if result["status"] in ("error", "skipped") else ""),
          flush=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def fmt_cell(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(fmt_cell(v) for v in value)
    return str(value)


def markdown(report):
    """The report as Markdown: a header, then one table per section."""
    m = report["machine"]
    lines = [f"# GPU check ({report['mode']}, device {m['device']})", "",
             f"{m.get('gpu') or m.get('cpu')}; torch {m['torch']}, CUDA {m.get('cuda')}; "
             f"summary {report.get('summary')}", ""]
    for name, section in report["sections"].items():
        lines.append(f"## {name}: {section['status'].upper()} ({section['seconds']} s)")
        for key in ("reason", "error", "note", "extrapolation"):
            if section.get(key):
                lines.append(f"\n{key}: {section[key]}")
        rows = section.get("rows") or []
        if rows:
            columns = list(dict.fromkeys(k for row in rows for k in row))
            lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(fmt_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def machine_info(device):
    """util.benchmark's machine description, plus the CUDA details."""
    info = benchmark_machine_info(device, torch.get_num_threads())
    info.update(cuda=torch.version.cuda, python=platform.python_version())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), capability=f"{props.major}.{props.minor}",
                    cudnn=torch.backends.cudnn.version())
    return info


# ---------------------------------------------------------------------- models
def model_config(name, **kwargs):
    """The FractalGen keywords of the configuration `name` (its record, models.get_config,
    without the sampling settings): the official FractalGen takes the same keywords."""
    return {k: v for k, v in get_config(name, **kwargs).items() if k != "sampling"}


def build_ours(name, device, seed=0, **kwargs):
    """A named configuration with random weights, built directly on `device`."""
    torch.manual_seed(seed)
    with torch.device(device):
        return create_model(name, **kwargs)


def rel_err(value, reference):
    return abs(value - reference) / abs(reference)


def sampling_settings(name, model, num_iter_list):
    """The official evaluation settings of `name` (for the tiny models: with guidance) at
    `num_iter_list`, cut to the model's generator levels."""
    settings = dict(DEFAULT_SAMPLING[name], num_iter_list=tuple(num_iter_list[:model.num_fractal_levels - 1]))
    if settings["cfg"] == 1.0:
        settings["cfg"] = TINY_CFG
    return settings


# ---------------------------------------------------------------------- section: environment
def section_environment(args, device):
    rates = {}
    max_n = 8192 if device.type == "cuda" else 512
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rates[name] = matmul_rate(device, dtype, max_n=max_n)
    rows = [dict(dtype=k, matmul_tflop_s=v / 1e12) for k, v in rates.items()]
    return dict(status="pass", rows=rows, matmul_flop_s=rates,
                tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                sdpa_flash=torch.backends.cuda.flash_sdp_enabled())


# ---------------------------------------------------------------------- section: golden
def load_golden(golden_dir, name):
    return torch.load(os.path.join(golden_dir, f"{name}.pth"), map_location="cpu", weights_only=True)


def golden_model(case, device):
    with torch.device(device):
        model = FractalGen(**case["config"])
    # case_mar_gp stores float16 values that are exactly its float32 weights
    model.load_state_dict({k: v.float() for k, v in case["model"].items()}, strict=True)
    return model.eval()


def golden_eval_losses(case, model, device, precision):
    """(variant, loss) of the deterministic eval losses: the plain AR loss, or each MAR
    fixed-mask variant."""
    imgs, labels = case["images"].to(device), case["labels"].to(device)
    with torch.no_grad(), autocast(device, precision):
        if "eval_loss_fixed_mask" not in case:
            yield "eval", model(imgs, labels).item(), case["eval_loss"]
            return
        for variant in case["eval_loss_fixed_mask"]:
            with fixed_masking(model, case["fixed_mask_orders"][variant["name"]]):
                yield variant["name"], model(imgs, labels).item(), variant["value"]


def golden_train(case, model, device):
    """Train-mode loss and total gradient norm without dropout, with the stored masks."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.label_drop_prob = 0.0
    tables = case["fixed_mask_orders"]["random_orders_k"] if "fixed_mask_orders" in case else {}
    with fixed_masking(model, tables):
        loss = model(case["images"].to(device), case["labels"].to(device))
    loss.backward()
    grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    model.eval()
    return loss.item(), torch.stack(grads).norm().item()


def section_golden(args, device):
    rows = []
    for name in GOLDEN_CASES:
        case = load_golden(args.golden_dir, name)
        model = golden_model(case, device)
        for precision, tol in (("fp32", args.fp32_tol), ("bf16", args.bf16_tol)):
            for variant, value, reference in golden_eval_losses(case, model, device, precision):
                err = rel_err(value, reference)
                rows.append(dict(case=name, check=variant, precision=precision, value=value, official=reference,
                                 rel_err=err, tol=tol, **{"pass": math.isfinite(value) and err <= tol}))
        loss, grad_norm = golden_train(case, model, device)
        reference = case["train_loss_fixed_nodrop"]
        for check, value, official, tol in (("train loss", loss, reference["value"], args.fp32_tol),
                                            # a norm over every gradient: 10x looser
                                            ("train grad norm", grad_norm, reference["grad_total_norm"],
                                             10 * args.fp32_tol)):
            err = rel_err(value, official)
            rows.append(dict(case=name, check=check, precision="fp32", value=value, official=official,
                             rel_err=err, tol=tol, **{"pass": math.isfinite(value) and err <= tol}))
    return dict(status=status_of(rows), rows=rows)


# ---------------------------------------------------------------------- section: train
def make_train_step(model, device, precision, optimizer_kwargs=None):
    """One training step as main_fractalgen.py takes it (autocast, scaled backward for fp16,
    unscale, clip at 3.0, AdamW over the same parameter groups). step(imgs, labels,
    inspect=False) returns the loss and, with inspect, the names of parameters without a
    (finite) gradient and whether the scaler skipped the step."""
    from main_fractalgen import param_groups  # heavy import (engine, FID), needed here only
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95),
                                  **(optimizer_kwargs or {}))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    params = [p for p in model.parameters() if p.requires_grad]

    def step(imgs, labels, inspect=False):
        with autocast(device, precision):
            loss = model(imgs, labels)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        info = {}
        if inspect:
            info["no_grad"] = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            info["nonfinite_grad"] = [n for n, p in model.named_parameters()
                                      if p.grad is not None and not torch.isfinite(p.grad).all()]
            scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(optimizer)
        scaler.update()
        if inspect and scale is not None:
            info["scaler_skipped"] = scaler.get_scale() < scale  # the scaler backs off after inf grads
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), info

    return step


def train_row(name, model, device, precision, batch, steps):
    step = make_train_step(model, device, precision)
    generator = torch.Generator().manual_seed(0)
    imgs, labels = random_batch(model, batch, device, generator)
    losses, times, skipped, no_grad, nonfinite = [], [], 0, set(), set()
    model.train()
    with PeakMemory(device) as memory:
        for _ in range(steps):
            synchronize(device)
            t0 = time.perf_counter()
            loss, info = step(imgs, labels, inspect=True)
            synchronize(device)
            times.append(time.perf_counter() - t0)
            losses.append(loss.float().item())
            no_grad.update(info["no_grad"])
            skipped += bool(info.get("scaler_skipped"))
            if not info.get("scaler_skipped"):  # inf grads of a skipped fp16 step are expected
                nonfinite.update(info["nonfinite_grad"])
    ok = all(math.isfinite(v) for v in losses) and not no_grad and not nonfinite and skipped < steps
    return dict(config=name, precision=precision, batch=batch, losses=losses, params_without_grad=len(no_grad),
                params_nonfinite_grad=len(nonfinite), scaler_skipped_steps=skipped,
                step_s=statistics.median(times), peak_mem_gib=(memory.peak or 0) / 2 ** 30,
                first_without_grad=sorted(no_grad)[:3], **{"pass": ok})


def section_train(args, device, plan):
    rows = []
    for name in plan["train_configs"]:
        try:
            model = build_ours(name, device)
            for precision in ("bf16", "fp16"):
                rows.append(train_row(name, model, device, precision, plan["train_batch"], plan["train_steps"]))
        except Exception as e:  # e.g. out of memory on one configuration: the others still run
            rows.append(dict(config=name, error=f"{type(e).__name__}: {one_line(e)}", **{"pass": False}))
        finally:
            model = None
    return dict(status=status_of(rows), rows=rows)


# ---------------------------------------------------------------------- section: torchrun
def section_torchrun(args, device, plan):
    """torchrun with one process: main_fractalgen.py joins a process group (NCCL on CUDA,
    gloo on the CPU) and trains 2 steps of batch 2 on a 4-image toy dataset."""
    from util.checkpoint import load_checkpoint
    from util.toy_data import make_dataset
    name = plan["torchrun_config"]
    with torch.device("meta"):
        size = create_model(name).img_size
    root = os.path.join(args.out, "torchrun")
    data = make_dataset(os.path.join(root, "data"), num_classes=2, num_train_per_class=2,
                        num_val_per_class=1, size=size)
    output = os.path.join(root, "output")
    shutil.rmtree(output, ignore_errors=True)  # a checkpoint of an earlier run must not pass for this one's
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(REPO / "main_fractalgen.py"), "--model", name, "--data_path", data, "--output_dir", output,
           "--device", str(device), "--batch_size", "2", "--epochs", "1", "--warmup_epochs", "1",
           "--num_workers", "2" if device.type == "cuda" else "0"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if device.type == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.torchrun_timeout)
    backend = "nccl" if device.type == "cuda" else "gloo"
    joined = f"distributed: 1 processes, backend {backend}" in proc.stdout
    steps = None
    ckpt_path = os.path.join(output, "checkpoint-last.pth")
    if proc.returncode == 0 and os.path.isfile(ckpt_path):
        steps = int(load_checkpoint(ckpt_path)["optimizer"]["state"][0]["step"])
    row = dict(config=name, backend=backend, returncode=proc.returncode, joined_group=joined, optimizer_steps=steps,
               **{"pass": proc.returncode == 0 and joined and steps == 2})
    return dict(status=status_of([row]), rows=[row], command=" ".join(cmd),
                stdout_tail=proc.stdout[-3000:], stderr_tail=proc.stderr[-3000:])


# ---------------------------------------------------------------------- section: sample
def class_conditions(model, labels, cfg):
    """The official sampling call's condition list: five references to the class
    embedding, with the unconditional rows appended when cfg != 1."""
    emb = model.class_emb(labels)
    if cfg != 1.0:
        emb = torch.cat([emb, model.fake_latent.repeat(len(labels), 1)])
    return [emb] * 5


def official_api_sample(model, labels, settings):
    """Normalised images through the official API `sample(cond_list, ...)`: the call that
    the official evaluation makes, which both implementations have."""
    with torch.no_grad():
        return model.sample(class_conditions(model, labels, settings["cfg"]), fractal_level=0, **settings)


def sample_row(name, model, device, precision, batch, settings, sample_kwargs):
    labels = torch.arange(batch, device=device) % model.class_num
    torch.manual_seed(0)
    with autocast(device, precision):
        normalised = official_api_sample(model, labels, settings)
        images = model.generate(labels, **settings, **sample_kwargs)
    off_grid = (from_uint8(to_uint8(normalised)) - normalised.float()).abs().max().item()
    size = model.img_size
    shape_ok = images.dtype == torch.uint8 and tuple(images.shape) == (batch, 3, size, size)
    return dict(config=name, precision=precision, batch=batch, num_iter_list=settings["num_iter_list"],
                max_off_grid=off_grid, finite=bool(torch.isfinite(normalised).all()), generate_uint8_shape=shape_ok,
                **{"pass": off_grid <= GRID_TOL and shape_ok})


def section_sample(args, device, plan):
    rows = []
    for name in plan["sample_configs"]:
        try:
            model = build_ours(name, device).eval()
            settings = sampling_settings(name, model, plan["sample_iters"])
            for precision in ("bf16", "fp32"):
                rows.append(sample_row(name, model, device, precision, plan["sample_batch"], settings,
                                       args.sample_kwargs))
        except Exception as e:
            rows.append(dict(config=name, error=f"{type(e).__name__}: {one_line(e)}", **{"pass": False}))
        finally:
            model = None
    return dict(status=status_of(rows), rows=rows)


# ---------------------------------------------------------------------- the official implementation
@lru_cache(maxsize=None)
def load_official(official_dir):
    """The official `models.fractalgen` module, imported from `official_dir`.

    The official repository has top-level packages `models` and `util` like ours: they are
    placed in sys.modules as packages rooted at `official_dir` while its files import, and
    ours are put back afterwards (the official modules keep references to each other)."""
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in ("models", "util")}
    try:
        for package in ("models", "util"):
            module = types.ModuleType(package)
            module.__path__ = [os.path.join(official_dir, package)]
            sys.modules[package] = module
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module("models.fractalgen")
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] in ("models", "util")]:
            del sys.modules[k]
        sys.modules.update(ours)


@contextlib.contextmanager
def official_context(device):
    """Where the official code runs: its deprecation warnings silenced, and off CUDA (the
    dry run) its hard-coded `.cuda()` calls on tensors made no-ops, so it runs on the CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if device.type == "cuda":
            with torch.cuda.device(device):
                yield
            return
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        try:
            yield
        finally:
            torch.Tensor.cuda = original


def official_pair(name, official_dir, device, training=False):
    """(ours, official): the same configuration with the same random weights (ours'
    state_dict loaded strictly into the official model), both in train or eval mode."""
    ours = build_ours(name, device)
    module = load_official(official_dir)
    with official_context(device), torch.device(device):
        official = module.FractalGen(**model_config(name))
    official.load_state_dict(ours.state_dict(), strict=True)
    return ours.train(training), official.train(training)


def official_levels(model):
    level = model
    while hasattr(level, "generator"):
        yield level
        level = level.next_fractal


def level_view(model):
    """What util.benchmark's level instrumentation needs (`levels()`), for either implementation."""
    return types.SimpleNamespace(levels=lambda: official_levels(model))


def timed(fn, device):
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def alternate(runs, pairs, device):
    """Time the two callables of `runs` {'official': f, 'ours': g} `pairs` times each,
    alternating which goes first (official, ours, ours, official, ...) so that drift of
    the machine hits both alike. Returns the seconds of each call and the median of the
    paired ratios official / ours (the speed-up)."""
    seconds = {"official": [], "ours": []}
    for i in range(pairs):
        order = ("official", "ours") if i % 2 == 0 else ("ours", "official")
        for side in order:
            seconds[side].append(timed(runs[side], device))
    ratios = [o / u for o, u in zip(seconds["official"], seconds["ours"])]
    return seconds, statistics.median(ratios)


def sampler(model, side, labels, settings, device, precision, sample_kwargs):
    """A callable drawing one batch: ours through generate(**sample_kwargs), the official
    model through its sampling API. Both seeded alike."""
    def run():
        torch.manual_seed(0)
        np.random.seed(0)
        with autocast(device, precision):
            if side == "ours":
                model.generate(labels, **settings, **sample_kwargs)
            else:
                with official_context(device):
                    official_api_sample(model, labels, settings)
    return run


def require_official(args, section):
    """The timing section `section`, or its 'skipped' record when the official code is absent."""
    if not os.path.isdir(os.path.join(args.official_dir, "models")):
        return lambda: dict(status="skipped", reason=f"official code not found at {args.official_dir}: clone it "
                                                     f"there with `git clone {OFFICIAL_URL} {args.official_dir}` "
                                                     f"to time against it")
    return section


# ---------------------------------------------------------------------- section: timing (a) sampling
def split_by_level(model, run, device):
    """Exclusive seconds of each level in one instrumented run (timers synchronise)."""
    sections = Sections(device)
    with instrument_levels(level_view(model), sections):
        total = timed(run, device)
    return total, {k: sections.time[k] for k in sections.time}


def choose_batch(seconds, batch, budget, max_batch):
    """Largest power-of-two multiple of `batch` (at most max_batch) whose run, scaled
    linearly from `seconds` at `batch`, fits in `budget`. On a GPU a larger batch costs at
    most proportionally more, so the estimate errs on the safe side."""
    while batch * 2 <= max_batch and seconds * 2 <= budget:
        seconds, batch = seconds * 2, batch * 2
    return batch


def extrapolate(split, used_iters, paper_iters):
    """Factor from the measured time to the paper's settings: each generator level's share
    of the time scales with its iteration count, the pixel head's stays (it draws every
    pixel once whatever the schedule)."""
    total = sum(split.values())
    factor = 0.0
    for name, seconds in split.items():
        level = int(name[1]) if name.startswith("L") else None
        scale = paper_iters[level] / used_iters[level] if level is not None else 1.0
        factor += seconds / total * scale
    return factor


def section_timing_sample(args, device, plan):
    spec = plan["huge"]
    num_iter = args.huge_num_iter or spec["num_iter_list"]
    ours, official = official_pair(spec["config"], args.official_dir, device)
    # the settings of the paper's FractalMAR-H run (also for the tiny stand-in), fewer iterations
    settings = dict(DEFAULT_SAMPLING[PAPER_SAMPLING["config"]], num_iter_list=tuple(num_iter))
    paper_iters = DEFAULT_SAMPLING[PAPER_SAMPLING["config"]]["num_iter_list"]
    budget = args.sample_budget_s or spec["budget_s"]
    per_run = budget / args.pairs

    def runs(batch):
        labels = torch.arange(batch, device=device) % ours.class_num
        return {side: sampler(model, side, labels, settings, device, spec["precision"], args.sample_kwargs)
                for side, model in (("ours", ours), ("official", official))}

    # calibration at a small batch (also the warm-up): time, split by level, FLOPs of ours
    first = spec["first_batch"]
    calibration = {side: split_by_level(model, runs(first)[side], device)
                   for side, model in (("official", official), ("ours", ours))}
    batch = choose_batch(calibration["official"][0], first, per_run, spec["max_batch"])
    seconds, speedup = timed_pairs_with_oom_retry(runs, batch, args.pairs, device, first)
    batch = seconds.pop("batch")
    rows = [dict(side=side, batch=batch, num_iter_list=num_iter, precision=spec["precision"],
                 s_per_image=statistics.median(seconds[side]) / batch, runs_s=seconds[side],
                 est_paper_s_per_image=statistics.median(seconds[side]) / batch
                 * extrapolate(calibration[side][1], num_iter, paper_iters),
                 **{"pass": True}) for side in ("official", "ours")]
    levels = {side: {k: v / first for k, v in calibration[side][1].items()} for side in calibration}
    flops = ours_flops(ours, runs(first)["ours"], first)
    rate = matmul_rate(device, torch.bfloat16, max_n=8192 if device.type == "cuda" else 512)
    # what bounds each level: its FLOP rate at the calibration batch against the bf16 matmul rate
    flops["levels_fraction_of_bf16_matmul_rate"] = {
        name: flops["levels_per_image"][name] / seconds_per_image / rate
        for name, seconds_per_image in levels["ours"].items() if name in flops["levels_per_image"]}
    return dict(status="pass", rows=rows, speedup=speedup, levels_s_per_image_at_calibration=levels,
                calibration_batch=first, settings=settings, sample_kwargs=args.sample_kwargs,
                paper=PAPER_SAMPLING, flops=flops,
                extrapolation=f"est_paper_s_per_image scales each generator level's share of the time "
                              f"(measured at batch {first}) by paper/used iterations "
                              f"({list(paper_iters)} vs {list(num_iter)}); the pixel head's share stays. "
                              f"The paper: {PAPER_SAMPLING['s_per_image']} s/image at batch "
                              f"{PAPER_SAMPLING['batch']} on one {PAPER_SAMPLING['gpu']}.")


def ours_flops(model, run, batch):
    """FLOPs per image of each level of one sampling run of ours (a counting replay)."""
    sections = Sections()
    with instrument_levels(model, sections), sections.count_flops():
        run()
    total, levels = level_flops(sections, model, batch)
    return dict(total_per_image=total, levels_per_image=levels)


def timed_pairs_with_oom_retry(runs, batch, pairs, device, smallest):
    """alternate() at `batch`, halving the batch after an out-of-memory error."""
    while True:
        try:
            seconds, speedup = alternate(runs(batch), pairs, device)
            return dict(seconds, batch=batch), speedup
        except torch.OutOfMemoryError:
            if batch // 2 < smallest:
                raise
            batch //= 2
            gc.collect()
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------- section: timing (b) training
def section_timing_train(args, device, plan):
    spec = plan["train64"]
    ours, official = official_pair(spec["config"], args.official_dir, device, training=True)
    imgs, labels = random_batch(ours, spec["batch"], device, torch.Generator().manual_seed(0))
    steps = {"ours": make_train_step(ours, device, spec["precision"], args.adamw_kwargs),
             "official": make_train_step(official, device, spec["precision"])}

    def block(side, count):
        def run():
            torch.manual_seed(0)
            np.random.seed(0)
            with official_context(device) if side == "official" else contextlib.nullcontext():
                for _ in range(count):
                    steps[side](imgs, labels)
        return run

    for side in steps:
        block(side, spec["warmup"])()
    runs = {side: block(side, spec["steps"]) for side in steps}
    memory = {}
    for side in runs:
        with PeakMemory(device) as peak:
            runs[side]()
        memory[side] = peak.peak
    seconds, speedup = alternate(runs, args.pairs, device)
    rows = [dict(side=side, batch=spec["batch"], precision=spec["precision"],
                 images_per_s=spec["batch"] * spec["steps"] / statistics.median(seconds[side]),
                 step_s=statistics.median(seconds[side]) / spec["steps"],
                 peak_mem_gib=(memory[side] or 0) / 2 ** 30, **{"pass": True}) for side in ("official", "ours")]
    return dict(status="pass", rows=rows, speedup=speedup, adamw_kwargs=args.adamw_kwargs,
                note=f"{args.pairs} alternating blocks of {spec['steps']} steps per side after {spec['warmup']} "
                     f"warm-up steps; same weights, same batch, AdamW lr 1e-4, clip 3.0")


# ---------------------------------------------------------------------- section: timing (c) latency
def section_timing_latency(args, device, plan):
    spec = plan["latency"]
    ours, official = official_pair(spec["config"], args.official_dir, device)
    # batch 1 with fractalar_in64's official settings (cfg 11), also for the tiny stand-in
    settings = sampling_settings("fractalar_in64", ours, DEFAULT_SAMPLING["fractalar_in64"]["num_iter_list"])
    labels = torch.zeros(1, dtype=torch.long, device=device)
    runs = {side: sampler(model, side, labels, settings, device, spec["precision"], args.sample_kwargs)
            for side, model in (("ours", ours), ("official", official))}
    seconds, speedup = alternate(runs, args.pairs, device)
    rows = [dict(side=side, batch=1, cfg=settings["cfg"], precision=spec["precision"],
                 s_per_image=statistics.median(seconds[side]), runs_s=seconds[side], **{"pass": True})
            for side in ("official", "ours")]
    return dict(status="pass", rows=rows, speedup=speedup, settings=settings, sample_kwargs=args.sample_kwargs,
                note="first pair includes first-call costs; a user measured the official code at 21 s/image "
                     "on an RTX 4090")


# ---------------------------------------------------------------------- section: profile
def section_profile(args, device, plan):
    """torch.profiler over one sampling batch of ours (the timing (a) configuration and
    settings): the top operators, in DIR/profile_sampling.txt and the JSON."""
    from torch.profiler import ProfilerActivity, profile
    spec = plan["huge"]
    model = build_ours(spec["config"], device).eval()
    settings = dict(DEFAULT_SAMPLING[PAPER_SAMPLING["config"]],
                    num_iter_list=tuple(args.huge_num_iter or spec["num_iter_list"]))
    labels = torch.arange(plan["profile_batch"], device=device) % model.class_num
    run = sampler(model, "ours", labels, settings, device, spec["precision"], args.sample_kwargs)
    run()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        synchronize(device)
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    path = os.path.join(args.out, "profile_sampling.txt")
    write_atomic(path, events.table(sort_by=sort_key, row_limit=30))
    top = sorted(events, key=lambda e: getattr(e, sort_key), reverse=True)[:10]
    rows = [dict(op=e.key, calls=e.count, self_cpu_ms=e.self_cpu_time_total / 1e3,
                 self_device_ms=e.self_device_time_total / 1e3) for e in top]
    return dict(status="pass", rows=rows, table=path, batch=plan["profile_batch"], settings=settings)


# ---------------------------------------------------------------------- driver
SECTIONS = ("environment", "golden", "train", "torchrun", "sample", "timing_sample", "timing_train",
            "timing_latency", "profile")


def parse_json_dict(flag, text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise UserInputError(f"{flag} {text!r} is not JSON; give an object, e.g. '{{\"fast\": true}}'") from None
    if not isinstance(value, dict):
        raise UserInputError(f"{flag} {text!r} must be a JSON object of keyword arguments, e.g. '{{\"fast\": true}}'")
    return value


def get_args_parser():
    p = cli.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and the profile")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu: with --small, a dry run)")
    p.add_argument("--small", action="store_true", help="tiny configurations and settings (a CPU dry run)")
    p.add_argument("--golden_dir", default=str(REPO / "tests" / "fixtures"), help="folder with case_*.pth")
    p.add_argument("--official_dir", default=str(REPO / "official" / "fractalgen"),
                   help=f"a checkout of {OFFICIAL_URL} (timing is skipped without it)")
    p.add_argument("--sections", nargs="+", default=[s for s in SECTIONS if s != "profile"], choices=SECTIONS,
                   help="run only these (default: all but profile)")
    p.add_argument("--profile", action="store_true", help="also run the profile section")
    p.add_argument("--fp32_tol", type=float, default=1e-4, help="relative tolerance of the fp32 golden losses")
    p.add_argument("--bf16_tol", type=float, default=1e-2, help="relative tolerance of the bf16 golden losses")
    p.add_argument("--sample_kwargs", default="{}", help="JSON object of extra keywords for our generate()")
    p.add_argument("--adamw_kwargs", default="{}", help="JSON object of extra AdamW keywords for our training "
                                                        "timing, e.g. '{\"fused\": true}'")
    p.add_argument("--huge_num_iter", default=None, help="num_iter_list of the FractalMAR-H timing (default 8,4,4)")
    p.add_argument("--sample_budget_s", type=float, default=None,
                   help="seconds per side for the FractalMAR-H timing (default 60; the batch is chosen to fit)")
    p.add_argument("--pairs", type=int, default=2, help="alternating official/ours runs per timing")
    p.add_argument("--torchrun_timeout", type=int, default=600)
    return p


def check_args(args):
    args.device = check_device(args.device)
    if args.device.type != "cuda" and not args.small:
        raise UserInputError(f"--device {args.device} runs the official configurations on a CPU, which takes "
                             f"hours; add --small for a dry run, or use --device cuda")
    for name in GOLDEN_CASES:
        if not os.path.isfile(os.path.join(args.golden_dir, f"{name}.pth")):
            raise UserInputError(f"--golden_dir {args.golden_dir} has no {name}.pth; point it at tests/fixtures")
    args.sample_kwargs = parse_json_dict("--sample_kwargs", args.sample_kwargs)
    args.adamw_kwargs = parse_json_dict("--adamw_kwargs", args.adamw_kwargs)
    args.huge_num_iter = parse_num_iter_list(args.huge_num_iter, "--huge_num_iter")
    args.pairs = positive_int("--pairs", args.pairs)
    for flag in ("fp32_tol", "bf16_tol"):
        if not getattr(args, flag) >= 0:
            raise UserInputError(f"--{flag} must be 0 or more, got {getattr(args, flag)}")
    if args.profile and "profile" not in args.sections:
        args.sections.append("profile")


def run(args):
    """Run the selected sections; returns the report dict (also written under args.out)."""
    check_args(args)
    device = args.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.makedirs(args.out, exist_ok=True)
    plan = PLANS["small" if args.small else "full"]
    report = dict(mode="small" if args.small else "full", machine=machine_info(device),
                  args={k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()},
                  sections={})
    functions = dict(environment=lambda: section_environment(args, device),
                     golden=lambda: section_golden(args, device),
                     train=lambda: section_train(args, device, plan),
                     torchrun=lambda: section_torchrun(args, device, plan),
                     sample=lambda: section_sample(args, device, plan),
                     timing_sample=require_official(args, lambda: section_timing_sample(args, device, plan)),
                     timing_train=require_official(args, lambda: section_timing_train(args, device, plan)),
                     timing_latency=require_official(args, lambda: section_timing_latency(args, device, plan)),
                     profile=lambda: section_profile(args, device, plan))
    for name in SECTIONS:
        if name in args.sections:
            run_section(report, name, functions[name], args.out)
    return report


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        report = run(args)
    except UserInputError as e:
        raise SystemExit(f"error: {e}") from None
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
