"""Stop requests from signals: SIGTERM / SIGUSR1 (cluster preemption, e.g. SLURM's
`--signal=USR1@90`) and SIGINT (Ctrl-C), and from the exit of the launcher.

Training (`install("step")`): a signal only records that a stop was asked for; the
training loop reads `requested()` at each step, folds it into the step's loss all-reduce
(so every rank learns of a signal that reached any one of them without an extra
collective), saves a checkpoint of that exact point and exits. Repeated SIGTERM / SIGUSR1
are ignored (launchers often signal a process twice: torchrun forwards the SIGTERM that
SLURM also sends to every task). A second Ctrl-C means "now": it raises KeyboardInterrupt,
but never inside `shielded()` (a checkpoint write), where it waits until the write is
complete.

Evaluation (`install("now")`): there is nothing to checkpoint, so a signal stops at once:
SIGINT raises KeyboardInterrupt, SIGTERM / SIGUSR1 raise `Terminated`.

Start-up (`install("startup")`, at the top of the command-line script, before the slow
imports): the first signal is recorded silently, so that main() stops with one line
instead of a traceback from inside `import torch` or a silent death.

`watch_launcher()` stops a process whose launcher (its parent: torchrun's agent, SLURM's
step daemon) exited, as a signal would: orphaned ranks would otherwise train on.

Processes forked from this one inherit the handler but ignore every signal, and
DataLoader workers ignore them outright (`ignore_in_worker`): the main process decides
when they stop.
"""
import contextlib
import os
import signal
import sys
import threading

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
LAUNCHER_POLL_SECONDS = 1.0

_state = {"owner": None, "requested": None, "interrupt": False, "shield": 0, "previous": {}, "mode": None,
          "watch": None}


class Terminated(BaseException):
    """SIGTERM / SIGUSR1 during evaluation (install("now")); args[0] is the signal name.
    A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it."""


def _handler(signum, frame):
    if os.getpid() != _state["owner"]:
        return
    name = signal.Signals(signum).name
    first = _state["requested"] is None
    if first:
        _state["requested"] = name
    mode = _state["mode"]
    if mode == "startup":
        return
    if mode == "now":
        if first:
            raise KeyboardInterrupt if name == "SIGINT" else Terminated(name)
        return
    if first:
        _notice(f"{name} received; stopping after the current step with a checkpoint"
                f"{' (Ctrl-C again: stop now, unsaved)' if name == 'SIGINT' else ''}")
        return
    if name == "SIGINT":
        if _state["shield"]:
            _state["interrupt"] = True
        else:
            raise KeyboardInterrupt


def _notice(text):
    # os.write, not print: a handler may run in the middle of another print
    os.write(2, f"rank {os.environ.get('RANK', '0')}: {text}\n".encode())


def install(mode="step"):
    """Catch the stop signals in this process (main thread only; elsewhere, e.g. a
    library calling main() from a thread, signals keep their handlers), as `mode` says:
    "step" (training), "now" (evaluation) or "startup". A request recorded by an earlier
    install in this process (at start-up) is kept. Returns whether the handlers were
    installed; `uninstall()` restores the previous ones."""
    if _state["owner"] != os.getpid():
        _state.update(owner=os.getpid(), requested=None, interrupt=False, shield=0)
    _state["mode"] = mode
    try:
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                previous = signal.signal(sig, _handler)
                _state["previous"].setdefault(sig, previous)
    except ValueError:  # not the main thread
        return False
    return True


def watch_launcher():
    """Stop this process when its parent, the launcher that started it, exits (e.g.
    torchrun's agent killed by a signal it does not forward): in training as a stop
    signal would (checkpoint at the next step; `requested()` names the launcher), in
    evaluation at once (one line, exit status 1). Polls once a second from a daemon
    thread; `uninstall()` ends the watch. Does nothing for a process already orphaned."""
    parent = os.getppid()
    if parent <= 1 or _state["watch"] is not None:
        return
    stop = _state["watch"] = threading.Event()

    def watch():
        while not stop.wait(LAUNCHER_POLL_SECONDS):
            if os.getppid() == parent:
                continue
            if _state["owner"] == os.getpid() and _state["mode"] == "step":
                _notice(f"the launcher (pid {parent}) exited; stopping after the current step with a checkpoint")
                request(f"the exit of its launcher (pid {parent})")
            else:
                _notice(f"the launcher (pid {parent}) exited; stopping")
                os._exit(1)
            return
    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def ignore_in_worker(worker_id=None):
    """DataLoader worker_init_fn of training: the worker ignores the stop signals (and does
    what `worker_init` does). Launchers signal a whole process group (torchrun's
    shutdown, SLURM), and PyTorch's workers die of a
    SIGTERM that does not come from their parent, while the main process, which finishes
    the step and checkpoints, still needs them. A SIGTERM from the parent (how
    multiprocessing ends leftover workers at exit) still ends the worker."""
    for name in ("SIGINT", "SIGUSR1"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
    worker_init()
    if not hasattr(signal, "sigwaitinfo"):  # not POSIX: keep PyTorch's SIGTERM handling
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it
    threading.Thread(target=_exit_on_sigterm_from_parent, args=(os.getppid(),), daemon=True).start()


def worker_init(worker_id=None):
    """DataLoader worker_init_fn of evaluation loaders (and part of `ignore_in_worker`):
    the worker lets go of the process group's connections and keeps quiet about a main
    process that was killed."""
    close_inherited_sockets()
    quiet_lost_connections()


def close_inherited_sockets():
    """Close this forked process's copies of the TCP connections it inherited (the
    process group's: gloo, the rendezvous store, NCCL's bootstrap), which it never uses.
    While a copy is open, a rank that is killed does not look dead to the others: they
    see its connections close only once its DataLoader workers exit too, seconds later."""
    import socket
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # not Linux: nothing to do cheaply
        return
    for fd in fds:
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            copy = os.dup(fd)
        except OSError:  # gone meanwhile (the listing's own fd)
            continue
        with socket.socket(fileno=copy) as sock:
            family = sock.family
        if family in (socket.AF_INET, socket.AF_INET6):
            os.close(fd)


def quiet_lost_connections():
    """A connection to the main process that breaks (the main process was killed while
    fetching a batch's shared memory from this worker) prints nothing. Python's fd-sharing
    thread and queue feeder thread would print a traceback of it onto the terminal after
    the run is gone; a main process that lives reports its own side of the failure."""
    from multiprocessing import queues
    lost = (ConnectionError, EOFError)
    previous_hook, previous_feeder_error = sys.excepthook, queues.Queue._on_queue_feeder_error

    def excepthook(kind, value, tb):
        if not issubclass(kind, lost):
            previous_hook(kind, value, tb)

    def feeder_error(e, obj):
        if not isinstance(e, lost):
            previous_feeder_error(e, obj)
    sys.excepthook = excepthook
    queues.Queue._on_queue_feeder_error = staticmethod(feeder_error)


def _exit_on_sigterm_from_parent(parent):
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


def uninstall():
    for sig, previous in _state["previous"].items():
        signal.signal(sig, previous)
    _state["previous"].clear()
    _state["owner"] = _state["mode"] = None
    if _state["watch"] is not None:
        _state["watch"].set()
        _state["watch"] = None


def requested():
    """The name of the first stop signal received ('SIGTERM', ...), or None."""
    return _state["requested"]


def request(name="SIGTERM"):
    """Ask for a stop as a signal would (tests, and code that wants a clean stop)."""
    if _state["requested"] is None:
        _state["requested"] = name


@contextlib.contextmanager
def shielded():
    """A block that a second Ctrl-C does not interrupt (it is raised once the block ends).
    Only the main thread can be interrupted, so elsewhere (a background checkpoint write,
    which the exiting interpreter waits for anyway) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state["shield"] += 1
    try:
        yield
    finally:
        _state["shield"] -= 1
    if not _state["shield"] and _state["interrupt"]:  # only reached when the block succeeded
        _state["interrupt"] = False
        raise KeyboardInterrupt
