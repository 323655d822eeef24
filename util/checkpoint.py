"""Checkpoints: atomic writes, one writer at a time, safe loads.

A checkpoint is the official dict {'model', 'optimizer', 'epoch', 'scaler', 'args'} with
`args` an argparse.Namespace, so official files and ours are interchangeable (ours may add
plain-typed keys such as 'train_state', which the official code ignores).

Writing goes to `<name>.tmp` in the same folder, is fsynced, and only then renamed over the
old checkpoint, which first becomes `checkpoint-prev.pth`: a crash mid-write leaves the
previous checkpoint intact, a checkpoint damaged later is not the only copy, and the temp
name is the same for every save, so a later save overwrites what a killed one left behind
(`remove_stale_temp_files` clears it at start). Loading (`load_checkpoint`, from
models.loading: models.load_model reads checkpoints too) uses `torch.load(weights_only=True)`,
which refuses arbitrary pickled code; argparse.Namespace is the only class allowed besides
tensors and plain containers. Before that, every record of the file's zip container is
checked against the CRC-32 that torch.save stored with it (torch.load does not check it),
so a flipped bit on disk or in a copy is found and, on resume, the previous checkpoint used.
"""
import glob
import os
import threading
import zipfile
import zlib

import torch

import util.misc as misc
from models.loading import (CHECKPOINT_NAME, SAFE_GLOBALS, SAMPLING_SOURCE, DamagedFileError,  # noqa: F401
                            checkpoint_class_num, load_checkpoint, safe_load, verify_zip_records)
from util import preempt
from util.misc import UserInputError, writing

PREVIOUS_NAME = "checkpoint-prev.pth"
TEMP_SUFFIX = ".tmp"


def checkpoint_path(folder_or_file):
    """--resume accepts a folder (holding checkpoint-last.pth) or the file itself."""
    if os.path.isfile(folder_or_file):
        return folder_or_file
    return os.path.join(folder_or_file, CHECKPOINT_NAME)


def save_checkpoint(state, path, keep_previous=False):
    """torch.save to `path` atomically: temp file in the same folder, fsync, rename.
    keep_previous: the file being replaced becomes checkpoint-prev.pth in that folder.
    An OSError (disk full, no permission) raises OutputWriteError naming `path`; the old
    checkpoint stays and the temp file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = path + TEMP_SUFFIX
    with writing(path), preempt.shielded():
        try:
            os.makedirs(folder, exist_ok=True)
            # through a Python file object: a failed write raises OSError with its errno
            # (given a path, torch.save reports a full disk as 'unexpected pos')
            with open(tmp, "wb") as f:
                _save_reporting_write_errors(state, f)
                f.flush()
                os.fsync(f.fileno())
            if keep_previous and os.path.isfile(path):
                # between these two renames only prev exists; resume falls back to it
                os.replace(path, os.path.join(folder, PREVIOUS_NAME))
            os.replace(tmp, path)  # atomic on POSIX and Windows when on the same filesystem
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        _fsync_folder(folder)


def store_sampling(path, settings, source):
    """Make `settings` (a dict of sampling settings) the stored sampling settings of the
    checkpoint at `path` (its 'sampling' entry), recording `source` (a plain dict; its 'by'
    says who chose them: "sweep", "quick start"; models.sampling) under 'sampling_source'.
    The official entries and the weights stay as they are; the file is replaced atomically.
    Returns True when the file changed."""
    ckpt = load_checkpoint(path)
    if ckpt.get("sampling") == settings and ckpt.get(SAMPLING_SOURCE) == source:
        return False
    ckpt["sampling"], ckpt[SAMPLING_SOURCE] = settings, source
    save_checkpoint(ckpt, path)
    return True


def file_signature(path):
    """(inode, size, mtime) of a file, None when there is none: a save or a store replaces
    the file (a new inode), so another signature means another write."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class _RecordingFile:
    """A file for torch.save that remembers the first OSError of a write. torch's zip
    writer does not pass it on: it fails later, when it closes the archive, with
    RuntimeError('... unexpected pos ...')."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        self.f.flush()


def _save_reporting_write_errors(state, f):
    """torch.save(state, f); a write that failed (disk full) raises its OSError."""
    recording = _RecordingFile(f)
    try:
        torch.save(state, recording)
    except RuntimeError:
        if recording.error is None:
            raise
        raise recording.error from None


def remove_stale_temp_files(folder):
    """Delete temp files that killed saves left in `folder` (ours, `*.pth.tmp`, and the
    `*.pth.tmp-<pid>` of earlier versions); returns their names."""
    stale = glob.glob(os.path.join(glob.escape(folder), "*.pth" + TEMP_SUFFIX + "*"))
    for path in stale:
        with writing(path):
            os.remove(path)
    return [os.path.basename(p) for p in stale]


def cpu_copy(obj):
    """A copy of a (nested) state whose tensors are detached CPU copies, so training can
    go on changing the originals while the copy is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, cpu_copy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints one at a time, optionally from a background thread.

    `save(state, path)` first waits for the previous write, then either writes at once or
    takes a CPU copy of `state` (the only stall training sees) and writes it from a thread.
    A failed background write is raised by the next `save` or `wait`. The thread is not a
    daemon: an interpreter that exits (also after Ctrl-C) finishes the write first."""

    def __init__(self, background=False):
        self.background = background
        self.thread = None
        self.error = None
        self.written = None  # file_signature of the last file written

    def save(self, state, path, keep_previous=True):
        self.wait()
        if not self.background:
            save_checkpoint(state, path, keep_previous)
            self.written = file_signature(path)
            return
        snapshot = cpu_copy(state)
        self.thread = threading.Thread(target=self._write, args=(snapshot, path, keep_previous),
                                       name="checkpoint-writer")
        self.thread.start()

    def _write(self, state, path, keep_previous):
        try:
            save_checkpoint(state, path, keep_previous)
            self.written = file_signature(path)
        except BaseException as e:  # handed to the main thread by wait()
            self.error = e

    def wait(self):
        """Block until the write in flight (if any) is on disk; raise its error."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _fsync_folder(folder):
    """Persist the rename itself (POSIX only; Windows cannot open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def previous_path(path):
    """checkpoint-prev.pth beside `path`, when `path` is a checkpoint-last.pth and it exists."""
    if os.path.basename(path) != CHECKPOINT_NAME:
        return None
    prev = os.path.join(os.path.dirname(path), PREVIOUS_NAME)
    return prev if os.path.isfile(prev) else None


def _load_usable(path, check):
    ckpt = load_checkpoint(path)
    if check is not None:
        check(ckpt, path)
    return ckpt


def load_latest_checkpoint(path, use_previous, check=None):
    """(checkpoint, path it came from) for `path`, a checkpoint-last.pth. check(ckpt, path),
    when given, raises UserInputError for a checkpoint this run cannot use (another
    model's). When `path` is missing, damaged or unusable and a checkpoint-prev.pth lies
    beside it, `use_previous` loads that instead, saying so in one line; otherwise the
    error names the previous file as the way out."""
    prev = previous_path(path)
    if prev is not None and not os.path.isfile(path):
        problem = f"{path} is missing (a save was stopped between its two renames)"
    else:
        try:
            return _load_usable(path, check), path
        except UserInputError as e:
            if prev is None:
                raise
            problem = getattr(e, "problem", None) or misc.one_line(e).rstrip(".")  # without its own advice
    if not use_previous:
        raise UserInputError(f"{problem}; the previous checkpoint {prev} is there: pass --resume {prev} "
                             f"to use it")
    try:
        ckpt = _load_usable(prev, check)
    except UserInputError as e:
        raise UserInputError(f"{problem}, and the previous checkpoint cannot be used either: "
                             f"{misc.one_line(e)}") from None
    misc.print0(f"warning: {problem}; resuming from the previous checkpoint {prev} instead (one save earlier)")
    return ckpt, prev


def checkpoint_model_name(ckpt):
    """The --model a checkpoint was trained with, when its args say so."""
    return getattr(ckpt.get("args"), "model", None)


def fingerprint(path):
    """A short id of a checkpoint file's contents, at no cost: a CRC-32 over the checksums
    its zip records carry (read from the archive's directory), else its size and
    modification time (files without checksums)."""
    try:
        with zipfile.ZipFile(path) as archive:
            crcs = [f"{info.filename}:{info.CRC:08x}" for info in archive.infolist()]
        if any(not crc.endswith(":00000000") for crc in crcs):
            return f"crc32:{zlib.crc32(chr(10).join(crcs).encode()):08x}"
    except (zipfile.BadZipFile, OSError):
        pass
    stat = os.stat(path)
    return f"size:{stat.st_size},mtime_ns:{stat.st_mtime_ns}"
