"""Progress bars that stay readable in log files.

On a terminal `progress_bar` is a plain tqdm bar, redrawn in place. Written to a file or a
pipe (a SLURM log, `2> log.txt`), a redrawn bar turns into carriage-return soup
(`step 1/16step 2/16...`), so there it writes whole lines instead, at most one every
`log_interval` seconds, plus the first and the last.
"""
import sys

from tqdm import tqdm

LOG_INTERVAL_S = 10.0


class LineProgress(tqdm):
    """tqdm that prints one complete line per update instead of redrawing one line."""

    def display(self, msg=None, pos=None):
        line = self.__str__() if msg is None else msg
        # an empty message clears the bar (nothing to clear here); close() shows the last
        # count again, which is already on its line
        if not line or self.n == getattr(self, "_shown_n", None):
            return True
        self._shown_n = self.n
        # each line ends when the next starts; tqdm's close() writes the last newline
        self.fp.write(("\n" if getattr(self, "_wrote_line", False) else "") + line)
        self.fp.flush()
        self._wrote_line = True
        return True


def is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or file-like objects without isatty
        return False


def progress_bar(iterable=None, total=None, desc=None, file=None, log_interval=LOG_INTERVAL_S, **kwargs):
    """tqdm(iterable, total, desc) on stderr (or `file`): redrawn on a terminal, one line
    every `log_interval` seconds otherwise. Extra keyword arguments go to tqdm."""
    file = file if file is not None else sys.stderr
    if is_terminal(file):
        return tqdm(iterable, total=total, desc=desc, file=file, **kwargs)
    kwargs.setdefault("mininterval", log_interval)
    kwargs.setdefault("ncols", 80)
    return LineProgress(iterable, total=total, desc=desc, file=file, ascii=True, **kwargs)
