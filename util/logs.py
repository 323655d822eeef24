"""log.txt and TensorBoard: writes that fail with one sentence, and rewinding on resume so
that each step and epoch is recorded once, however often a run was interrupted.

A resumed run repeats what happened after its checkpoint; before it starts, the entries
written after that point (by the run that died) are removed: log.txt lines of later
epochs, and TensorBoard events past the checkpoint on their axis. Files are rewritten
atomically (temp file, rename), so a crash while rewinding loses nothing either.
"""
import glob
import json
import os
import threading

from util.misc import replacing, writing

EVENTS_PATTERN = "events.out.tfevents.*"


class LogWriter:
    """TensorBoard SummaryWriter whose failures (disk full, no permission; raised by its
    writer thread on a later call) become one OutputWriteError naming the folder and
    `flag`, the option that chose it (--log_dir, or --output_dir when that is the folder)."""

    def __init__(self, folder, flag="--log_dir"):
        from torch.utils.tensorboard import SummaryWriter  # slow import: only when logging
        _quiet_writer_threads()
        self.folder, self.flag = folder, flag
        with writing(folder, flag):
            self.writer = SummaryWriter(log_dir=folder)

    def add_scalar(self, tag, value, step):
        with writing(self.folder, self.flag):
            self.writer.add_scalar(tag, value, step)

    def flush(self):
        with writing(self.folder, self.flag):
            self.writer.flush()

    def close(self):
        with writing(self.folder, self.flag):
            self.writer.close()


def _quiet_writer_threads():
    """Keep threading's 'Exception in thread' traceback of TensorBoard's writer thread off
    the terminal: the thread keeps its error, and the next call on the writer raises it in
    the main thread, where LogWriter turns it into one sentence."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    if getattr(threading.excepthook, "quiet_tensorboard", False):
        return
    previous = threading.excepthook

    def hook(args):
        if not isinstance(args.thread, _AsyncWriterThread):
            previous(args)
    hook.quiet_tensorboard = True
    threading.excepthook = hook


def append_line(path, entry):
    """Append one JSON line to log.txt."""
    with writing(path), open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _replace_contents(path, write):
    with writing(path), replacing(path, tmp=path + ".tmp"), open(path + ".tmp", "wb") as f:
        write(f)


def rewind_log(path, last_epoch, last_entry=None):
    """Keep the log.txt lines of epochs <= last_epoch (and drop a torn last line); add
    `last_entry` (the line of epoch last_epoch, kept in the checkpoint) when it is missing,
    as after a kill between the checkpoint and the line."""
    if not os.path.isfile(path):
        lines = []
    else:
        with open(path) as f:
            lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("epoch", last_epoch + 1) <= last_epoch:
            kept.append(entry)
    if last_entry is not None and last_entry["epoch"] not in {e["epoch"] for e in kept}:
        kept.append(last_entry)
    if kept or os.path.isfile(path):
        _replace_contents(path, lambda f: f.write("".join(json.dumps(e) + "\n" for e in kept).encode()))


def rewind_tensorboard(folder, keep):
    """Drop the scalar events for which keep(tag, step) is False from every event file in
    `folder` (a file is rewritten only when something goes; a torn last record goes too).
    Returns how many events were dropped."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.summary.writer.record_writer import RecordWriter
    dropped = 0
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), EVENTS_PATTERN))):
        if path.endswith(".tmp"):
            os.remove(path)  # a rewind that died
            continue
        events = list(EventFileLoader(path).Load())
        kept = [e for e in events if all(keep(v.tag, e.step) for v in e.summary.value)]
        if len(kept) == len(events):
            continue
        dropped += len(events) - len(kept)

        def write(f, kept=kept):
            records = RecordWriter(f)
            for event in kept:
                records.write(event.SerializeToString())
        _replace_contents(path, write)
    return dropped
