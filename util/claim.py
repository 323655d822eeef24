"""One writer per output folder: a run claims --output_dir for as long as it writes there.

The claim is `OUTPUT_DIR/fractalgen.lock`, holding the host, pid and start time of the
claiming process (rank 0) under a POSIX record lock. The kernel drops the lock when that
process ends, however it ends (kill -9 too), so the claim of a dead run is taken over by
the next one, and a live claim refuses the next run with one line naming its holder. The
lock belongs to the process alone: DataLoader workers forked from it do not hold it after
it died. On NFS the lock goes through the NFS lock manager, so runs on two hosts see each
other. A run that ends normally removes the file (and the folder, when the claim created
it and nothing else was written there).
"""
import datetime
import errno
import fcntl
import json
import os
import socket

from util.misc import UserInputError, writing

LOCK_NAME = "fractalgen.lock"
_HELD_ELSEWHERE = (errno.EACCES, errno.EAGAIN)  # what F_SETLK reports for a lock another process holds


class OutputDirInUseError(UserInputError):
    """Another live run holds the claim on the output folder."""


class Claim:
    """The claim on one folder; `release()` gives it up (idempotent)."""

    def __init__(self, folder, fd, path, created):
        self.folder, self.fd, self.path, self.created = folder, fd, path, created
        self.took_over = None  # the dead run whose claim this one took over, described

    def release(self):
        if self.fd is None:
            return
        try:
            os.remove(self.path)  # while still locked: a run starting now makes a new file
        except OSError:
            pass
        os.close(self.fd)  # drops the lock
        self.fd = None
        for folder in reversed(self.created):  # only folders this claim made, only if empty
            try:
                os.rmdir(folder)
            except OSError:
                break


def holder_text(path):
    """'host H, pid P, since T' of the claim file at `path`."""
    try:
        with open(path) as f:
            return describe(f.read())
    except OSError:
        return "its details cannot be read"


def describe(text):
    """'host H, pid P, since T' of a claim file's contents."""
    try:
        info = json.loads(text)
        return f"host {info['host']}, pid {info['pid']}, since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "its details are not written yet"


def claim(folder, flag="--output_dir"):
    """Create `folder` if needed and claim it for this process. Returns a Claim; raises
    OutputDirInUseError with one sentence when a live run holds it, OutputWriteError when
    the folder cannot be written. `took_over` on the Claim names a dead run's claim that
    was taken over (None when there was none)."""
    created = _missing_folders(folder)
    with writing(folder, flag):
        os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    while True:
        with writing(path, flag):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in _HELD_ELSEWHERE:
                raise OutputDirInUseError(
                    f"{flag} {folder} is in use by another run ({holder_text(path)}): two runs writing one folder "
                    f"would overwrite each other's checkpoints; wait for it to end or stop it, or pass another "
                    f"{flag}") from None
            # a file system without locks: go on unprotected rather than not at all
            print(f"warning: cannot lock {path} ({os.strerror(e.errno)}): a second run on {flag} {folder} would "
                  f"not be stopped", flush=True)
            return Claim(folder, None, path, created)
        if _same_file(fd, path):
            break
        os.close(fd)  # the file was removed by a run that just ended: claim the new one
    previous = os.read(fd, 4096).decode(errors="replace").strip()
    info = dict(host=socket.gethostname(), pid=os.getpid(),
                since=datetime.datetime.now().isoformat(sep=" ", timespec="seconds"))
    with writing(path, flag):
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
    result = Claim(folder, fd, path, created)
    result.took_over = describe(previous) if previous else None
    return result


def _same_file(fd, path):
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _missing_folders(folder):
    """The folders os.makedirs(folder) would create, outermost first."""
    missing = []
    folder = os.path.abspath(folder)
    while folder and not os.path.exists(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return missing[::-1]
