"""SIGKILL a training run again and again, then let it finish (used by test_resilience).

    python tests/kill_harness.py ARGV_JSON KILLS SEED

Imports torch once, then forks one child per attempt that runs main() (resuming from
--output_dir) and kills it with SIGKILL (see main_loop for when; delays come from a
seeded RNG). After KILLS kills the last child runs to the end. Prints a JSON report."""
import json
import os
import random
import signal
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from main_fractalgen import get_args_parser, main  # noqa: E402


def run_child(argv):
    try:
        result = main(get_args_parser().parse_args(argv))
        code = 3 if "stopped" in result else 0
    except SystemExit as e:
        print(e.code, file=sys.stderr, flush=True)
        code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    os._exit(code)


def wait_for(pid, deadline, until=None):
    """Poll until the child exits (its status), `until()` holds or the deadline passes (None)."""
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if until is not None and until():
            return None
        time.sleep(0.001)
    return None


def inode(path):
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def main_loop(argv, kills, seed):
    """Every third kill lands the moment a save starts writing (mid-save); the others at a
    random delay after one completed save, at the latest when the next save starts. So a
    killed attempt completes at most one checkpoint, whatever the machine's speed, and
    the run (8 saves with --save_every_steps 1) is still unfinished after 10 kills."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    out = argv[argv.index("--output_dir") + 1]
    last, tmp = os.path.join(out, "checkpoint-last.pth"), os.path.join(out, "checkpoint-last.pth.tmp")
    report = {"kills": 0, "mid_save": 0, "attempts": 0}
    while True:
        report["attempts"] += 1
        before = inode(last)
        pid = os.fork()
        if pid == 0:
            run_child(argv)
        if report["kills"] >= kills:
            report["exit_code"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            return report
        far = time.monotonic() + 120
        code = wait_for(pid, far, lambda: not os.path.exists(tmp))  # the child clears a stale temp file
        if code is None and report["kills"] % 3 != 2:
            code = wait_for(pid, far, lambda: inode(last) != before)  # one save completed
            if code is None:
                code = wait_for(pid, time.monotonic() + rng.uniform(0, 0.1), lambda: os.path.exists(tmp))
        elif code is None:
            code = wait_for(pid, far, lambda: os.path.exists(tmp))
        if code is not None:  # finished before the kill: the run is complete
            report["exit_code"] = code
            return report
        report["mid_save"] += os.path.exists(tmp)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        report["kills"] += 1


if __name__ == "__main__":
    print(json.dumps(main_loop(json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))), flush=True)
