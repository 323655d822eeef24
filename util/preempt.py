"""Stop requests from signals: SIGTERM / SIGUSR1 (cluster preemption, e.g. SLURM's
`--signal=USR1@90`) and SIGINT (Ctrl-C).

A signal only records that a stop was asked for; the training loop reads `requested()` at
each step, folds it into the step's loss all-reduce (so every rank learns of a signal that
reached any one of them without an extra collective), saves a checkpoint of that exact
point and exits. Repeated SIGTERM / SIGUSR1 are ignored (launchers often signal a process
twice: torchrun forwards the SIGTERM that SLURM also sends to every task). A second Ctrl-C
means "now": it raises KeyboardInterrupt, but never inside `shielded()` (a checkpoint
write), where it waits until the write is complete.

Processes forked from this one inherit the handler but ignore every signal, and
DataLoader workers ignore them outright (`ignore_in_worker`): the main process decides
when they stop.
"""
import contextlib
import os
import signal
import threading

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

_state = {"owner": None, "requested": None, "interrupt": False, "shield": 0, "previous": {}}


def _handler(signum, frame):
    if os.getpid() != _state["owner"]:
        return
    name = signal.Signals(signum).name
    if _state["requested"] is None:
        _state["requested"] = name
        # os.write, not print: a handler may run in the middle of another print
        os.write(2, f"rank {os.environ.get('RANK', '0')}: {name} received; stopping after the current step with a "
                    f"checkpoint{' (Ctrl-C again: stop now, unsaved)' if name == 'SIGINT' else ''}\n".encode())
        return
    if name == "SIGINT":
        if _state["shield"]:
            _state["interrupt"] = True
        else:
            raise KeyboardInterrupt


def install():
    """Catch the stop signals in this process (main thread only; elsewhere, e.g. a
    library calling main() from a thread, signals keep their handlers). Returns whether
    the handlers were installed; `uninstall()` restores the previous ones."""
    _state.update(owner=os.getpid(), requested=None, interrupt=False, shield=0)
    try:
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                _state["previous"][sig] = signal.signal(sig, _handler)
    except ValueError:  # not the main thread
        return False
    return True


def ignore_in_worker(worker_id=None):
    """DataLoader worker_init_fn: the worker ignores the stop signals. Launchers signal a
    whole process group (torchrun's shutdown, SLURM), and PyTorch's workers die of a
    SIGTERM that does not come from their parent, while the main process, which finishes
    the step and checkpoints, still needs them. A SIGTERM from the parent (how
    multiprocessing ends leftover workers at exit) still ends the worker."""
    for name in ("SIGINT", "SIGUSR1"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # not POSIX: keep PyTorch's SIGTERM handling
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it
    threading.Thread(target=_exit_on_sigterm_from_parent, args=(os.getppid(),), daemon=True).start()


def _exit_on_sigterm_from_parent(parent):
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


def uninstall():
    for sig, previous in _state["previous"].items():
        signal.signal(sig, previous)
    _state["previous"].clear()
    _state["owner"] = None


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
