"""Distributed set-up, seeding, mixed precision and progress logging.

One code path serves every launch: plain `python main_fractalgen.py` (one process, no
process group), `torchrun` (env vars RANK / WORLD_SIZE / LOCAL_RANK), SLURM `srun`
(SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID) and OpenMPI on ITP (`--dist_on_itp`).
CUDA devices talk over NCCL, CPU processes over gloo.
"""
import contextlib
import datetime
import errno
import math
import os
import random
import time
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist

from models.errors import UserInputError
from util.validation import check_device

# Default of --dist_timeout (minutes): how long a rank waits in a collective for the others
# before the job ends. The longest legitimate one-sided wait is a few minutes (rank 0 alone
# writing a checkpoint or computing FID statistics); a stalled node should not hold the
# whole job for hours.
DIST_TIMEOUT_MINUTES = 10
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class OutputWriteError(UserInputError):
    """A file could not be written (disk full, no permission, read-only file system)."""


class CollectiveTimeoutError(RuntimeError):
    """A collective waited longer than --dist_timeout: another rank stalled or died."""


# How gloo and NCCL word a collective that failed because another process went away
# (killed, crashed) rather than being slow
_LOST_PEER = ("connection reset", "connection closed", "broken pipe", "connection refused", "remote process exited",
              "socket closed", "read error", "write error", "ncclremoteerror")


def collective_failure(exc):
    """'timeout' when a collective's RuntimeError says the others did not answer in time,
    'lost' when the connection to another process broke (it died), else None."""
    text = str(exc).lower()
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if any(words in text for words in _LOST_PEER):
        return "lost"
    return None


# (reason, fix) for the errors a user can do something about
_WRITE_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free space there or pass {flag} on another disk"),
    errno.EDQUOT: ("the disk quota is exhausted", "free space there or pass {flag} on another disk"),
    errno.EACCES: ("permission denied", "make it writable or pass another {flag}"),
    errno.EPERM: ("operation not permitted", "make it writable or pass another {flag}"),
    errno.EROFS: ("the file system is read-only", "pass {flag} on a writable disk"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "pass another {flag}"),
    errno.EEXIST: ("a file is in the way of a folder", "pass another {flag}"),
}


def write_error_message(path, exc, flag="--output_dir"):
    """One sentence for an OSError raised while writing `path`."""
    reason, fix = _WRITE_ERRORS.get(exc.errno, (exc.strerror or type(exc).__name__,
                                                "check the disk and pass another {flag} if needed"))
    return f"cannot write {path}: {reason}; {fix.format(flag=flag)}"


@contextlib.contextmanager
def replacing(path, tmp=None):
    """Yield a temporary path in the folder of `path`; when the block completes, rename it
    over `path`. A crash mid-write leaves the previous file whole, and the temporary one is
    removed on any error. tmp: its name, default `<path>.tmp-<pid>`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = tmp or f"{os.fspath(path)}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def writing(path, flag="--output_dir"):
    """Turn an OSError raised inside the block into an OutputWriteError naming `path`."""
    try:
        yield
    except OSError as e:
        raise OutputWriteError(write_error_message(path, e, flag)) from None


def one_line(exc):
    """The user-facing sentence of an exception. DataLoader workers re-raise errors with
    the worker's traceback prepended; keep only the original message (its last line)."""
    text = str(exc).strip()
    last = text.splitlines()[-1] if text else type(exc).__name__
    for prefix in (f"{type(exc).__module__}.{type(exc).__name__}: ", f"{type(exc).__name__}: "):
        if last.startswith(prefix):
            last = last[len(prefix):]
    return last


# ---------------------------------------------------------------------- distributed
def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def print0(*args, **kwargs):
    """print on rank 0 only (every rank runs the same code; one copy of the log is enough)."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def barrier():
    if is_dist():
        dist.barrier()


def _launch_env(args):
    """(rank, world_size, local_rank, init_url) from the launcher's environment, or None
    for a single process."""
    env = os.environ
    if args.dist_on_itp:  # OpenMPI: ranks from OMPI_*, rendezvous from MASTER_ADDR/PORT
        needed = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                  "MASTER_ADDR", "MASTER_PORT")
        missing = [name for name in needed if name not in env]
        if missing:
            raise UserInputError(f"--dist_on_itp needs the environment variables {', '.join(missing)}; "
                                 f"launch with mpirun or drop the flag")
        url = f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        return (int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                int(env["OMPI_COMM_WORLD_LOCAL_RANK"]), url)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / torch.distributed.launch
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), args.dist_url
    if int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env:  # srun python main_fractalgen.py
        if args.dist_url == "env://" and not ("MASTER_ADDR" in env and "MASTER_PORT" in env):
            raise UserInputError("SLURM launch without a rendezvous address: export MASTER_ADDR and "
                                 "MASTER_PORT (e.g. the first node of $SLURM_JOB_NODELIST) or pass "
                                 "--dist_url tcp://HOST:PORT")
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), args.dist_url
    return None


def resolve_device(requested, local_rank):
    """--device (None: CUDA when present, else CPU) -> torch.device; every process of a
    multi-GPU launch takes the GPU of its local rank."""
    device = check_device(requested)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def init_distributed_mode(args):
    """Join the process group if a launcher started us; set args.rank, args.world_size,
    args.gpu, args.distributed and args.device (a string, e.g. 'cuda:3' or 'cpu')."""
    launch = _launch_env(args)
    rank, world_size, local_rank, url = launch or (0, 1, max(args.local_rank, 0), None)
    if args.world_size not in (1, world_size):  # the flag is informative; the launcher decides
        raise UserInputError(f"--world_size {args.world_size} but {world_size} process(es) were launched; "
                             f"start them with torchrun --nproc_per_node (or srun) instead")
    device = resolve_device(args.device, local_rank)
    args.rank, args.world_size, args.gpu = rank, world_size, local_rank
    args.device = str(device)
    # a launcher's processes always join a group, even a single one (as the official code
    # does): `torchrun --nproc_per_node=1` then runs NCCL and DDP on one GPU
    args.distributed = launch is not None
    if not args.distributed:
        return device
    backend = "nccl" if device.type == "cuda" else "gloo"
    minutes = getattr(args, "dist_timeout", DIST_TIMEOUT_MINUTES)
    try:
        dist.init_process_group(backend=backend, init_method=url, world_size=world_size, rank=rank,
                                timeout=datetime.timedelta(minutes=minutes),
                                device_id=device if device.type == "cuda" else None)
    except RuntimeError as e:  # torch.distributed's DistNetworkError / DistStoreError: nobody answered
        raise UserInputError(f"rank {rank}: could not join the other {world_size - 1} process(es) at {url} within "
                             f"--dist_timeout {minutes:g} min ({one_line(e).rstrip('.')}); check MASTER_ADDR / "
                             f"MASTER_PORT, and raise --dist_timeout when the processes start far apart") from None
    print0(f"distributed: {world_size} processes, backend {backend}, init {url}")
    dist.barrier()
    return device


def rank0_first(fn, what, device, then_others=True):
    """Run fn on rank 0, then (then_others) on the other ranks, for work that fills a cache
    the others then find (a download). A failure on rank 0 stops every rank, none is left
    waiting."""
    error = None
    if is_main_process():
        try:
            fn()
        except UserInputError as e:
            error = e
    failed = all_reduce_sum([float(error is not None)], device)[0]
    if error is not None:
        raise error
    if failed:
        raise UserInputError(f"rank 0 could not {what}; its error message says why")
    if then_others and not is_main_process():
        fn()


def cleanup_distributed():
    """Leave the process group (no barrier: after an error the other ranks may be gone)."""
    if is_dist():
        dist.destroy_process_group()


def all_reduce_sum(values, device):
    """Sum a list of floats over all ranks (float64, so large counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_dist():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_mean(value, device):
    return all_reduce_sum([value], device)[0] / get_world_size()


def all_gather_rows(rows, device):
    """Every rank's `rows` (n_r, ...) concatenated in rank order, on the CPU. The counts
    n_r may differ between ranks (even be 0): each rank pads to the largest before the
    all_gather and the padding is cut off after it. `device` is where the collective runs
    (the process group's: CUDA for NCCL, CPU for gloo)."""
    if not is_dist():
        return rows.cpu()
    counts = torch.zeros(get_world_size(), dtype=torch.int64, device=device)
    counts[get_rank()] = rows.shape[0]
    dist.all_reduce(counts)  # (world_size,): every rank's row count
    counts = counts.tolist()
    padded = rows.new_zeros((max(counts), *rows.shape[1:]), device=device)
    padded[:rows.shape[0]] = rows.to(device)
    pieces = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:n].cpu() for piece, n in zip(pieces, counts)])


# ---------------------------------------------------------------------- seeding / precision
def seed_everything(*keys):
    """Seed torch, numpy and python's random from a tuple of ints, e.g. (seed, epoch, rank):
    different tuples give independent streams, and the same tuple the same stream, so an
    epoch replays exactly after a resume."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2)
    seed = int(state[0]) << 32 | int(state[1])
    torch.manual_seed(seed)
    np.random.seed(int(state[0]))
    random.seed(seed)


def resolve_precision(requested, device):
    """--precision (None: fp16 on CUDA, as the official runs, with a gradient scaler; fp32
    elsewhere) -> 'fp32' | 'bf16' | 'fp16'."""
    precision = requested or ("fp16" if device.type == "cuda" else "fp32")
    if precision == "fp16" and device.type != "cuda":
        raise UserInputError(f"--precision fp16 needs a CUDA device (got {device}); use bf16 or fp32")
    return precision


def autocast(device, precision):
    """Mixed-precision context for forward passes (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[precision])


def keep_freed_memory():
    """Make glibc serve every allocation from its heap and keep freed memory (mallopt
    M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB) instead of mapping fresh pages for each large
    tensor and unmapping them on free. On CPU the first touch of a fresh page is a page
    fault: about 20 ms per 64 MB tensor on a 2-core AMD EPYC VM, and a training step of
    the 64x64 benchmark models allocates dozens of those (PyTorch's CPU tuning guide
    recommends a reusing allocator, jemalloc or tcmalloc, for the same reason).
    Process-wide, so only entry points call it; returns whether it was applied (False off
    glibc)."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------- progress logging
class SmoothedValue:
    """A series of values: windowed median/average for the log line, global average for
    the epoch summary. (Values logged during training are already all-reduced means.)"""

    def __init__(self, window_size=20, fmt="{median:.4f} ({global_avg:.4f})"):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self):
        return float(np.median(self.deque)) if self.deque else float("nan")

    @property
    def avg(self):
        return float(np.mean(self.deque)) if self.deque else float("nan")

    @property
    def global_avg(self):
        return self.total / self.count if self.count else float("nan")

    @property
    def value(self):
        return self.deque[-1] if self.deque else float("nan")

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Named SmoothedValues plus `log_every`, which prints progress with an ETA."""

    def __init__(self, delimiter="  "):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **values):
        for name, value in values.items():
            self.meters[name].update(float(value))

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable, print_freq, header=""):
        """Yield from `iterable`, printing `header [i/N] eta ... meters ... time` every
        `print_freq` items and on the last one (rank 0 only)."""
        total = len(iterable)
        width = len(str(total))
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        start = end = time.time()
        for i, item in enumerate(iterable):
            data_time.update(time.time() - end)
            yield item
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = format_seconds(iter_time.global_avg * (total - i - 1))
                parts = [f"{header} [{i:>{width}}/{total}]", f"eta: {eta}", str(self),
                         f"time: {iter_time}", f"data: {data_time}"]
                print0(self.delimiter.join(part for part in parts if part))
            end = time.time()
        if total:
            took = time.time() - start
            print0(f"{header} total time: {format_seconds(took)} ({took / total:.4f} s / it)")


def progress(iterable, desc, total=None, unit="it"):
    """A tqdm progress bar over `iterable` on rank 0, silent on the other ranks. It goes to
    stderr, so stdout logs stay clean; when stderr is not a terminal (a log file) it
    writes a whole line at most once a minute (util.progress), so the file stays short."""
    from util.progress import progress_bar
    return progress_bar(iterable, desc=desc, total=total, unit=unit, log_interval=60, disable=not is_main_process())


def format_seconds(seconds):
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))
