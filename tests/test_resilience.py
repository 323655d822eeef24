"""Long runs lose nothing: stops by signal, SIGKILL at random moments (also mid-save),
exact mid-epoch resume on 1 and 2 processes, stalled ranks, full disks and unwritable
output folders. Tiny model, tiny images, few steps."""
import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import engine_fractalgen as engine
from conftest import main_in_one_thread
from util import checkpoint as ckpt_util
from util import logs
from util.misc import UserInputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_argv(data, out, *extra, epochs=2):
    """fractalmar_tiny on the 12 tiny images, batch 4 (3 steps per epoch), one DataLoader
    worker (flips are keyed, not drawn by the worker), label dropout and MAR masks on, and
    an EMA of the weights (rate 0.9: a few steps move it visibly)."""
    return [str(a) for a in ["--model", "fractalmar_tiny", "--data_path", data, "--output_dir", out,
                             "--resume", out, "--device", "cpu", "--batch_size", 4, "--epochs", epochs,
                             "--warmup_epochs", 1, "--blr", 1e-2, "--label_drop_prob", 0.5, "--save_last_freq", 1,
                             "--num_workers", 1, "--seed", 3, "--ema_rate", 0.9, *extra]]


def assert_same_training(a, b):
    """Bitwise equal weights, EMA weights and optimizer state of two checkpoint folders; the
    EMA weights under the model's own keys (no DDP 'module.' prefix) and not the weights."""
    ca = ckpt_util.load_checkpoint(os.path.join(a, ckpt_util.CHECKPOINT_NAME))
    cb = ckpt_util.load_checkpoint(os.path.join(b, ckpt_util.CHECKPOINT_NAME))
    assert ca["epoch"] == cb["epoch"] and ca["train_state"]["epoch"] == cb["train_state"]["epoch"]
    for key, value in ca["model"].items():
        assert torch.equal(value, cb["model"][key]), key
    assert list(ca["model_ema"]) == list(cb["model_ema"]) == list(ca["model"])
    for key, value in ca["model_ema"].items():
        assert value.dtype == torch.float32 and torch.equal(value, cb["model_ema"][key]), key
    assert not torch.equal(ca["model_ema"]["class_emb.weight"], ca["model"]["class_emb.weight"])
    for index, state in ca["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, cb["optimizer"]["state"][index][name]), (index, name)


def logged(out):
    """(log.txt lines, {tag: [(step, value), ...]} over every TensorBoard file) of a run."""
    with open(os.path.join(out, "log.txt")) as f:
        lines = [json.loads(line) for line in f]
    return lines, logged_scalars(out)


def logged_scalars(out):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    scalars = {}
    for name in sorted(os.listdir(out)):
        if name.startswith("events.out.tfevents"):
            for event in EventFileLoader(os.path.join(out, name)).Load():
                for value in event.summary.value:
                    scalars.setdefault(value.tag, []).append((event.step, value.tensor.float_val[0]))
    return {tag: sorted(points) for tag, points in scalars.items()}


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    """An uninterrupted 2-epoch run: the reference every interrupted run must equal."""
    out = str(tmp_path_factory.mktemp("straight"))
    main_in_one_thread(train_argv(tiny_data, out))
    return out


def test_sigterm_mid_epoch_checkpoints_that_step_and_resumes_exactly(run_main, tiny_data, straight, tmp_path,
                                                                     monkeypatch, capsys):
    out = str(tmp_path / "run")
    real_step, calls = torch.optim.AdamW.step, []

    def signal_during_step_4(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # epoch 1, step 0: the signal arrives mid-epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", signal_during_step_4)
    result = run_main(*train_argv(tiny_data, out, "--save_thread"))  # the stop waits for the writer
    text = capsys.readouterr().out
    assert result["stopped"] == {"epoch": 1, "step": 2, "steps": 3, "signal": "SIGTERM",
                                 "checkpoint": os.path.join(out, "checkpoint-last.pth")}
    # the signal came during step 0 of epoch 1; step 1's all-reduce carries it: stop after step 1
    assert "rank 0: stopped by SIGTERM after step 2 of 3 in epoch 1" in text and "To continue, run the same command again" in text
    ckpt = ckpt_util.load_checkpoint(os.path.join(out, "checkpoint-last.pth"))
    assert ckpt["epoch"] == 0 and ckpt["train_state"]["step"] == 2 and ckpt["optimizer"]["state"][0]["step"] == 5
    monkeypatch.undo()

    result = run_main(*train_argv(tiny_data, out))
    assert "stopped" not in result and "continuing at step 2 of epoch 1" in capsys.readouterr().out
    assert_same_training(straight, out)
    assert logged(out) == logged(straight)  # every step and epoch once, with the same numbers
    assert sorted(f for f in os.listdir(out) if not f.startswith("events")) == [
        "checkpoint-last.pth", "checkpoint-prev.pth", "log.txt"]


def test_every_step_checkpoint_and_resume_at_each_point_is_exact(run_main, tiny_data, straight, tmp_path):
    """--save_every_steps 1: resuming from the checkpoint after any step gives the same run."""
    out = str(tmp_path / "run")
    run_main(*train_argv(tiny_data, out, "--save_every_steps", 1, epochs=1))  # 3 steps, then epoch 0 end
    ckpt = ckpt_util.load_checkpoint(os.path.join(out, "checkpoint-prev.pth"))
    assert ckpt["train_state"]["step"] == 3 and ckpt["train_state"]["epoch"] == 0  # last step of epoch 0
    run_main(*train_argv(tiny_data, out, "--save_every_steps", 1))
    assert_same_training(straight, out)
    assert logged(out) == logged(straight)


def test_output_dir_under_a_file_is_one_sentence(run_main, tiny_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as err:
        run_main(*train_argv(tiny_data, str(blocker / "out"), epochs=1))
    assert str(err.value.code) == (f"error: cannot write {blocker / 'out'}: a part of the path is a file, not a "
                                   f"folder; pass another --output_dir")


def test_full_disk_on_log_png_and_tensorboard_writes_is_one_sentence(tmp_path, monkeypatch):
    from PIL import Image
    path = str(tmp_path / "00000.png")

    def half_written_png(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", half_written_png)
    with pytest.raises(UserInputError, match=r"cannot write .*00000\.png: no space left on the device"):
        engine.save_png(torch.zeros(3, 4, 4, dtype=torch.uint8), path)
    assert not os.path.exists(path)  # nothing half-written stays

    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(UserInputError, match=r"cannot write .*log\.txt: no space left on the device"):
        logs.append_line(str(tmp_path / "log.txt"), {"epoch": 0})
    monkeypatch.undo()

    writer = logs.LogWriter(str(tmp_path / "tb"))
    monkeypatch.setattr(writer.writer, "add_scalar", lambda *a: (_ for _ in ()).throw(OSError(errno.EROFS, "ro")))
    with pytest.raises(UserInputError, match=r"cannot write .*tb: the file system is read-only; "
                                             r"pass --log_dir on a writable disk"):
        writer.add_scalar("train_loss", 1.0, 0)
    monkeypatch.undo()
    writer.close()
    (tmp_path / "blocker").write_text("")
    with pytest.raises(UserInputError, match=r"cannot write .*blocker.tb: a part of the path is a file"):
        logs.LogWriter(str(tmp_path / "blocker" / "tb"))


def test_rewind_keeps_earlier_entries_and_drops_a_torn_line(tmp_path):
    path = str(tmp_path / "log.txt")
    with open(path, "w") as f:
        f.write('{"epoch": 0, "loss": 1}\n{"epoch": 1, "loss": 2}\n{"epoch": 2, "lo')
    logs.rewind_log(path, 0)
    assert open(path).read() == '{"epoch": 0, "loss": 1}\n'
    logs.rewind_log(path, 1, {"epoch": 1, "loss": 5})  # the line lost after the checkpoint comes back
    assert open(path).read() == '{"epoch": 0, "loss": 1}\n{"epoch": 1, "loss": 5}\n'


def test_sigkill_at_random_moments_then_resume_is_exact_with_no_stray_files(tiny_data, straight, tmp_path,
                                                                            child_env):
    """10 SIGKILLs (every third one while the checkpoint is being written), each followed
    by a resume from --output_dir, then a run to the end: the same weights, optimizer
    state, log.txt and TensorBoard scalars as the uninterrupted run, and no temp files."""
    out = str(tmp_path / "run")
    argv = train_argv(tiny_data, out, "--save_every_steps", 1)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "kill_harness.py"), json.dumps(argv),
                           "10", "0"], cwd=REPO, env=child_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["kills"] == 10 and report["mid_save"] >= 3 and report["exit_code"] == 0, (
        proc.stdout[-3000:] + proc.stderr[-3000:])
    assert_same_training(straight, out)
    assert logged(out) == logged(straight)
    assert sorted(f for f in os.listdir(out) if not f.startswith("events")) == [
        "checkpoint-last.pth", "checkpoint-prev.pth", "log.txt"]


# Runs the command-line entry of one rank; FAULT="SIGNAL:RANK:N[:parent]" makes that rank
# send SIGNAL to itself (or to its parent, the torchrun agent) at its N-th optimizer step:
# a preemption, or a stall with SIGSTOP.
RANK_WRAPPER = """
import os, signal, sys, torch
sys.path.insert(0, {repo!r})
name, rank, at, *target = (os.environ.get("FAULT") or "none:-1:0").split(":")
if int(rank) == int(os.environ["RANK"]):
    step, calls = torch.optim.AdamW.step, []
    def faulty_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == int(at):
            os.kill(os.getppid() if target else os.getpid(), getattr(signal, name))
        return step(self, *args, **kwargs)
    torch.optim.AdamW.step = faulty_step
from main_fractalgen import script_main
script_main(sys.argv[1:])
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(wrapper, argv, env, fault=None, nproc=2):
    """Start nproc ranks the way torchrun does (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port, FAULT=fault or "")
        procs.append(subprocess.Popen([sys.executable, str(wrapper), *argv], cwd=REPO, env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout=240):
    return [(p.wait(timeout), *p.communicate()) for p in procs]


def test_two_processes_sigterm_to_one_rank_stops_both_and_resumes_exactly(tiny_data, tmp_path, child_env):
    """12 images, 2 per rank and step: 3 steps in the epoch. Rank 1 alone is signalled
    during its first step; both ranks stop after the second (the next all-reduce), exit
    with --requeue_exit_code, and the resumed run ends bitwise equal to a straight one."""
    wrapper = tmp_path / "rank.py"
    wrapper.write_text(RANK_WRAPPER.format(repo=REPO))
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    argv = lambda out, *extra: train_argv(tiny_data, out, "--batch_size", 2, *extra, epochs=1)  # noqa: E731
    first = launch(wrapper, argv(straight), child_env)
    second = launch(wrapper, argv(split, "--requeue_exit_code", 3), child_env, fault="SIGTERM:1:1")
    for code, out, err in finish(first):
        assert code == 0, err[-3000:]
    for rank, (code, out, err) in enumerate(finish(second)):
        assert code == 3 and "Traceback" not in err, err[-3000:]
        why = "stopped by SIGTERM" if rank == 1 else "stopped (another process was signalled)"
        assert f"rank {rank}: {why} after step 2 of 3 in epoch 0" in out, out[-2000:]
    ckpt = ckpt_util.load_checkpoint(os.path.join(split, "checkpoint-last.pth"))
    assert ckpt["train_state"]["step"] == 2 and ckpt["train_state"]["world_size"] == 2
    resumed = finish(launch(wrapper, argv(split), child_env))
    assert all(code == 0 for code, _, _ in resumed), resumed[0][2][-3000:]
    assert "continuing at step 2 of epoch 0" in resumed[0][1]
    assert_same_training(straight, split)
    assert logged(split) == logged(straight)


def test_a_stalled_rank_ends_the_job_on_the_healthy_one_within_the_timeout(tiny_data, tmp_path, child_env):
    wrapper = tmp_path / "rank.py"
    wrapper.write_text(RANK_WRAPPER.format(repo=REPO))
    out = str(tmp_path / "run")
    procs = launch(wrapper, train_argv(tiny_data, out, "--batch_size", 2, "--dist_timeout", 0.1, epochs=1), child_env,
                   fault="SIGSTOP:1:2")
    try:
        start = time.monotonic()
        code, stdout, stderr = finish(procs[:1], timeout=120)[0]
        waited = time.monotonic() - start
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert code == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f"error: rank 0: no answer from the other processes within --dist_timeout 0.1 min (one stalled or died; "
        f"see its log); stopping. The last checkpoint in {out} is intact: resume with --resume {out}")
    assert waited < 60


def test_a_killed_rank_ends_the_job_on_the_healthy_one_with_one_line_within_seconds(tiny_data, tmp_path, child_env):
    """kill -9 of rank 1 at its second step: rank 0 meets the broken connection in its next
    collective and stops with one line, also while rank 1's DataLoader worker lives on."""
    wrapper = tmp_path / "rank.py"
    wrapper.write_text(RANK_WRAPPER.format(repo=REPO))
    out = str(tmp_path / "run")
    procs = launch(wrapper, train_argv(tiny_data, out, "--batch_size", 2, epochs=1), child_env, fault="SIGKILL:1:2")
    procs[1].wait(240)
    died = time.monotonic()
    code, stdout, stderr = finish(procs[:1], timeout=120)[0]
    assert procs[1].returncode == -signal.SIGKILL
    assert code == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f"error: rank 0: lost the connection to another process (it died or was killed; see its log); stopping. The "
        f"last checkpoint in {out} is intact: resume with --resume {out}")
    assert time.monotonic() - died < 30


LAUNCHER = """
import json, os, subprocess, sys
ranks = []
for rank in range(2):
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    with open(os.path.join(sys.argv[1], f"rank{rank}.log"), "w") as log:
        ranks.append(subprocess.Popen([sys.executable, *sys.argv[2:]], env=env, stdout=log, stderr=log))
print(json.dumps([p.pid for p in ranks]), flush=True)
for p in ranks:
    p.wait()
"""


def gone(pid):
    """Whether process `pid` has exited (it may linger as a zombie of whoever adopted it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
def test_ranks_whose_launcher_died_stop_within_seconds_with_a_checkpoint(tiny_data, tmp_path, child_env):
    """The launcher (as torchrun's agent killed by a signal it does not forward) dies while
    its 2 ranks train a long run: they notice, stop together after the next step with a
    checkpoint and one line each, instead of training on as orphans."""
    wrapper, launcher = tmp_path / "rank.py", tmp_path / "launcher.py"
    wrapper.write_text(RANK_WRAPPER.format(repo=REPO))
    launcher.write_text(LAUNCHER)
    out = str(tmp_path / "run")
    env = dict(child_env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), FAULT="SIGKILL:0:2:parent")
    proc = subprocess.Popen([sys.executable, str(launcher), str(tmp_path), str(wrapper),
                             *train_argv(tiny_data, out, "--batch_size", 2, epochs=100)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    ranks = json.loads(proc.stdout.readline())
    try:
        assert proc.wait(240) == -signal.SIGKILL  # rank 0 killed it at its second step
        died = time.monotonic()
        while not all(gone(pid) for pid in ranks) and time.monotonic() - died < 60:
            time.sleep(0.2)
        assert all(gone(pid) for pid in ranks), "ranks trained on after their launcher died"
    finally:
        for pid in ranks:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
    state = ckpt_util.load_checkpoint(os.path.join(out, "checkpoint-last.pth"))["train_state"]
    assert state["epoch"] < 50  # within seconds: a few of the 100 epochs at most
    for rank in range(2):
        text = (tmp_path / f"rank{rank}.log").read_text()
        assert "Traceback" not in text, text[-3000:]
        assert (f"rank {rank}: stopped by the exit of its launcher (pid {proc.pid}) after step {state['step']} of 3 "
                f"in epoch {state['epoch']}; {out}/checkpoint-last.pth holds this point") in text, text[-3000:]


def test_torchrun_killed_by_a_signal_it_does_not_forward_leaves_no_orphans(tiny_data, tmp_path, child_env):
    """The issue's case: SIGUSR1 to torchrun's agent (no --signals-to-handle) kills the
    agent. Its 2 ranks must stop within seconds, with a checkpoint and one line each,
    instead of training on as orphans."""
    wrapper = tmp_path / "rank.py"
    wrapper.write_text(RANK_WRAPPER.format(repo=REPO))
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper),
           *train_argv(tiny_data, out, "--batch_size", 2, epochs=100)]
    agent = subprocess.Popen(cmd, cwd=REPO, env=dict(child_env, FAULT="SIGUSR1:0:2:parent"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = agent.communicate(timeout=150)  # the pipes close when the ranks have exited too
    finally:
        try:
            os.killpg(agent.pid, signal.SIGKILL)  # orphans, if any, are still in the agent's session
        except ProcessLookupError:
            pass
    assert agent.returncode == -signal.SIGUSR1
    assert "Traceback" not in stderr, stderr[-3000:]
    state = ckpt_util.load_checkpoint(os.path.join(out, "checkpoint-last.pth"))["train_state"]
    assert state["epoch"] < 50  # within seconds: a few of the 100 epochs at most
    for rank in range(2):
        assert (f"rank {rank}: stopped by the exit of its launcher (pid {agent.pid}) after step {state['step']} of 3 "
                f"in epoch {state['epoch']}; {out}/checkpoint-last.pth holds this point") in stdout, stdout[-3000:]


def test_rewind_drops_tensorboard_events_from_the_checkpoint_on(tmp_path):
    """A checkpoint after step 1 of epoch 1 (3 steps an epoch): the dead run's steps from
    there on, and evaluations of epoch 1 and later, go; earlier ones stay."""
    import argparse
    from main_fractalgen import rewind_logs
    writer = logs.LogWriter(str(tmp_path))
    for epoch in range(3):
        for step in range(3):
            writer.add_scalar("train_loss", 1.0, engine.step_axis(epoch, step, 3))
        writer.add_scalar("fid_cfg1.0", 2.0, epoch)
    writer.close()
    args = argparse.Namespace(output_dir=str(tmp_path), log_dir=None, start_epoch=0)
    rewind_logs(args, {"epoch": 0, "train_state": {"epoch": 1, "step": 1, "steps_per_epoch": 3}}, 3)
    scalars = logged_scalars(str(tmp_path))
    assert [x for x, _ in scalars["train_loss"]] == [0, 333, 666, 1000]
    assert [x for x, _ in scalars["fid_cfg1.0"]] == [0]


@pytest.mark.slow
def test_sigterm_to_the_torchrun_agent_stops_every_worker_cleanly(tiny_data, tmp_path, child_env):
    """torchrun forwards SIGTERM to its workers (and their DataLoader workers, which must
    survive it); each saves-or-waits and prints its line. The agent itself still logs its
    own SignalException (torchrun's code)."""
    wrapper = tmp_path / "rank.py"
    wrapper.write_text(RANK_WRAPPER.format(repo=REPO))
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper),
           *train_argv(tiny_data, out, "--batch_size", 2, epochs=1)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(child_env, FAULT="SIGTERM:0:1:parent"), capture_output=True,
                          text=True, timeout=300)
    for rank in range(2):
        assert f"rank {rank}: stopped by SIGTERM after step 2 of 3 in epoch 0" in proc.stdout, proc.stderr[-3000:]
    assert "[rank" not in proc.stderr  # no worker traceback (DataLoader workers survived the group signal)
    assert ckpt_util.load_checkpoint(os.path.join(out, "checkpoint-last.pth"))["train_state"]["step"] == 2


def test_repeated_signals_sigterm_ignored_second_ctrl_c_waits_for_the_save():
    from util import preempt
    assert preempt.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # launchers signal twice: ignored
        assert preempt.requested() == "SIGUSR1"
        events = []
        with pytest.raises(KeyboardInterrupt):
            with preempt.shielded():  # a checkpoint write: a second Ctrl-C waits for its end
                os.kill(os.getpid(), signal.SIGINT)
                events.append("write finished")
        assert events == ["write finished"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        preempt.uninstall()
