"""Command-line pieces every entry point shares.

- `ArgumentParser`: a mistake on the command line is one line (`prog: error: ...`) with a
  "did you mean" for a misspelt flag or choice, instead of the whole usage block.
- `HelpFormatter`: `--help` shows a default only where it means something (not for on/off
  switches, nor for defaults that are worked out at run time: the help text says those).
- `--threads`: `add_threads_flag` / `set_threads`; "auto" (the default) takes the cores
  that other work leaves free, so a shared machine is not oversubscribed.
- `default_num_workers`: data loader processes that suit this machine.

Only the standard library at import time (util/download.py runs before torch is installed).
"""
import argparse
import difflib
import os
import re

THREADS_HELP = ("CPU threads for torch: a number, or auto = the cores other work leaves free (cores minus the "
                "1-minute load average, split between the processes of a torchrun job, at most torch's own "
                "choice). More threads than free cores make every step many times slower")
SMALL_MODEL_PARAMS = 1_000_000  # below this, sampling takes seconds: compiling never pays
MAX_DEFAULT_WORKERS = 10  # the official default


def shows_default(action):
    """An option that takes a value and has a fixed default (not a switch, not None)."""
    return action.nargs != 0 and action.default not in (None, "", argparse.SUPPRESS)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" for options that take a value and have a fixed default, unless
    the help text already speaks of the default. Switches (store_true / store_false) and
    defaults left to run time (None) show none: their help text says what happens."""

    def _get_help_string(self, action):
        text = action.help or ""
        if shows_default(action) and "default" not in text.lower():
            text = f"{text} (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `prog: error: <what>; did you mean --x? (--help lists
    the options)`. The usage block is not printed (it runs to dozens of lines)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.help is None and shows_default(action):  # argparse prints no help line for help=None
            action.help = "default: %(default)s"
        return action

    def error(self, message):
        hint = self.suggestion(message)
        self.exit(2, f"{self.prog}: error: {message}{hint} (--help lists the options)\n")

    def option_names(self):
        return [name for action in self._actions for name in action.option_strings
                if action.help != argparse.SUPPRESS]

    def suggestion(self, message):
        """'; did you mean ...?' for the first misspelt flag or choice in an argparse error."""
        if message.startswith("unrecognized arguments:"):
            names = self.option_names()
            for word in message.split(":", 1)[1].split():
                if not word.startswith("-"):
                    continue
                flag = word.split("=", 1)[0]
                candidates = [flag, "--" + flag.lstrip("-").replace("-", "_")]
                for candidate in candidates:
                    close = difflib.get_close_matches(candidate, names, n=1, cutoff=0.6)
                    if close and close[0] != flag:
                        return f"; did you mean {close[0]}?"
            return ""
        found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if found:
            choices = [c.strip().strip("'") for c in found.group(2).split(",")]
            close = difflib.get_close_matches(found.group(1), choices, n=1, cutoff=0.5)
            if close:
                return f"; did you mean {close[0]}?"
        return ""


# ---------------------------------------------------------------------- threads
def threads_value(text):
    """argparse type of --threads: 'auto' or a positive integer."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of threads or auto, got {text!r}")
    return value


def add_threads_flag(parser, default="auto", help=THREADS_HELP):
    parser.add_argument("--threads", type=threads_value, default=default, help=help)


def usable_cores():
    """Cores this process may run on: its CPU affinity, within a container's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def free_cores():
    """Cores that other work leaves free: usable cores minus the 1-minute load average
    (at least one)."""
    cores = usable_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


def auto_threads(processes=None):
    """The 'auto' thread count: the free cores split between this machine's processes of the
    job (torchrun's LOCAL_WORLD_SIZE), never above torch's current setting (which follows
    OMP_NUM_THREADS when that is set)."""
    import torch

    if processes is None:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(torch.get_num_threads(), free_cores() // max(1, processes)))


def set_threads(value, processes=None, flag="--threads"):
    """Apply a --threads value ('auto' or a number) to torch; returns the thread count. A bad
    value raises UserInputError naming `flag`."""
    import torch

    from .misc import UserInputError

    try:
        value = threads_value(value)
    except argparse.ArgumentTypeError as e:
        raise UserInputError(f"{flag} {e}") from None
    threads = auto_threads(processes) if value == "auto" else value
    torch.set_num_threads(threads)
    return threads


def default_num_workers():
    """Data loader worker processes: the official 10, but no more than the usable cores
    (torch warns that more 'might freeze' the machine)."""
    return min(MAX_DEFAULT_WORKERS, usable_cores())


# ---------------------------------------------------------------------- --fast
def fast_notice(fast, model):
    """The line to print before a fast (compiled) sampler's first call, or None."""
    if not fast:
        return None
    text = ("fast sampler: compiling first, which takes a minute or two (less when an earlier run's compiled "
            "code is cached on disk); it pays off when sampling without it takes longer than that (large AR "
            "models, many images)")
    params = sum(p.numel() for p in model.parameters())
    if params < SMALL_MODEL_PARAMS:
        text += f". This model ({params / 1e6:.2f}M parameters) samples in seconds without it: drop --fast"
    return text
