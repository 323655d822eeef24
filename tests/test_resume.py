"""What a resumed training run does: where it continues (mid-epoch, at an epoch end, from an
official checkpoint), that every later epoch is whole, what a changed batch layout does,
which checkpoints the step and time triggers write, that the log survives a kill between
checkpoint and log line, and that evaluation never swaps in other weights. Tiny model,
12 images, 3 steps per epoch; each run takes about a second."""
import argparse
import os
import shutil
import time
from unittest import mock

import pytest
import torch

from test_resilience import assert_same_training, logged, train_argv
from util import checkpoint as ckpt_util
from util import preempt

pytestmark = pytest.mark.usefixtures("one_thread")


def main(argv):
    from main_fractalgen import get_args_parser
    from main_fractalgen import main as run
    return run(get_args_parser().parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """{'straight': an uninterrupted 2-epoch run, 'stopped': the same run stopped (a stop
    request during step 0) after step 2 of epoch 0}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = str(tmp_path_factory.mktemp("straight"))
        main(train_argv(tiny_data, straight))
        stopped = str(tmp_path_factory.mktemp("stopped"))
        step, calls = torch.optim.AdamW.step, []

        def stop_during_step_0(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                preempt.request("SIGTERM")
            return step(self, *args, **kwargs)
        with mock.patch.object(torch.optim.AdamW, "step", stop_during_step_0):
            result = main(train_argv(tiny_data, stopped))
        assert (result["stopped"]["epoch"], result["stopped"]["step"]) == (0, 2)
    finally:
        torch.set_num_threads(threads)
    return {"straight": straight, "stopped": stopped}


def copy_of(runs, name, tmp_path):
    out = str(tmp_path / name)
    shutil.copytree(runs[name], out)
    return out


def optimizer_steps(folder):
    ckpt = ckpt_util.load_checkpoint(os.path.join(folder, ckpt_util.CHECKPOINT_NAME))
    return int(ckpt["optimizer"]["state"][0]["step"])


@pytest.fixture
def saved_positions(monkeypatch):
    """(epoch, step) of the train_state of every checkpoint written, in order."""
    saved, save = [], torch.save

    def recording_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "train_state" in obj:
            saved.append((obj["train_state"]["epoch"], obj["train_state"]["step"]))
        return save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", recording_save)
    return saved


def test_a_run_resumed_mid_epoch_trains_every_later_epoch_whole(runs, tiny_data, tmp_path):
    """Resumed after step 2 of epoch 0 with --epochs 2: the rest of epoch 0, then all of
    epoch 1 (not epoch 1 from step 2): the uninterrupted run's weights, optimizer and logs."""
    out = copy_of(runs, "stopped", tmp_path)
    main(train_argv(tiny_data, out))
    assert optimizer_steps(out) == 6
    assert_same_training(runs["straight"], out)
    assert logged(out) == logged(runs["straight"])


def test_epoch_end_log_line_survives_a_kill_before_it_is_written_and_step_saves_count_globally(
        runs, tiny_data, tmp_path, saved_positions):
    """Epoch 0 finished (checkpoint written) but killed before its log.txt line: the next
    resume writes the line from the checkpoint. --save_every_steps 2 counts steps from the
    start of training, across epochs: in epoch 1 (global steps 4..6) it saves after its
    1st and 3rd step, not its 2nd."""
    out = copy_of(runs, "stopped", tmp_path)
    main(train_argv(tiny_data, out, epochs=1))
    log = os.path.join(out, "log.txt")
    with open(log) as f:
        lines = f.readlines()
    assert len(lines) == 1
    with open(log, "w") as f:  # as if killed between the checkpoint and the line
        f.writelines(lines[:-1])
    saved_positions.clear()
    main(train_argv(tiny_data, out, "--save_every_steps", 2))
    assert logged(out) == logged(runs["straight"])
    assert_same_training(runs["straight"], out)
    assert saved_positions == [(1, 1), (1, 3), (2, 0)]  # steps 1 and 3 of epoch 1, then the epoch end


def test_log_lines_written_after_the_checkpoint_are_written_once(runs, tiny_data, tmp_path):
    """Checkpoints every 2nd epoch: epoch 0 is checkpointed, epoch 1 only logged, then the
    run dies in epoch 2 without saving (Ctrl-C twice). The resumed run redoes epoch 1 and
    2: log.txt and TensorBoard hold each epoch and step once, as an uninterrupted run's."""
    straight, out = str(tmp_path / "straight"), str(tmp_path / "run")
    main(train_argv(tiny_data, straight, "--save_last_freq", 2, epochs=3))
    step, calls = torch.optim.AdamW.step, []

    def interrupted_in_epoch_2(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # epoch 2, step 1
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)
    with mock.patch.object(torch.optim.AdamW, "step", interrupted_in_epoch_2), pytest.raises(SystemExit):
        main(train_argv(tiny_data, out, "--save_last_freq", 2, epochs=3))
    assert len(logged(out)[0]) == 2  # epochs 0 and 1 logged, only epoch 0 checkpointed
    main(train_argv(tiny_data, out, "--save_last_freq", 2, epochs=3))
    assert logged(out) == logged(straight)
    assert_same_training(straight, out)


def test_another_batch_layout_restarts_the_interrupted_epoch_from_its_first_step(runs, tiny_data, tmp_path,
                                                                               capsys):
    """Stopped after step 2 of 3 (batch 4); resumed with batch 2 an epoch has 6 steps and
    'the rest of the epoch' is not defined: epoch 0 runs again from its first step, whole."""
    out = copy_of(runs, "stopped", tmp_path)
    main(train_argv(tiny_data, out, "--batch_size", 2, epochs=1))
    assert "restarting epoch 0 from its first step" in capsys.readouterr().out
    assert optimizer_steps(out) == 2 + 6
    ckpt = ckpt_util.load_checkpoint(os.path.join(out, ckpt_util.CHECKPOINT_NAME))
    assert (ckpt["epoch"], ckpt["train_state"]["step"], ckpt["train_state"]["steps_per_epoch"]) == (0, 0, 6)


def test_an_official_checkpoint_resumes_at_the_next_epoch(runs, tiny_data, tmp_path, capsys):
    """An official file says only 'epoch': k, the last epoch done: training goes on at k + 1,
    and ends as the uninterrupted run does."""
    prev = ckpt_util.load_checkpoint(os.path.join(runs["straight"], "checkpoint-prev.pth"))
    assert prev["epoch"] == 0 and prev["train_state"]["step"] == 0  # the end of epoch 0
    out = tmp_path / "official"
    out.mkdir()
    torch.save({k: prev[k] for k in ("model", "optimizer", "epoch", "scaler", "args")}, out / "checkpoint-last.pth")
    main(train_argv(tiny_data, str(out)))
    assert "continuing at epoch 1" in capsys.readouterr().out
    assert optimizer_steps(out) == 6
    # the weights and optimizer of the uninterrupted run (an official file has no EMA to continue)
    ours, theirs = (ckpt_util.load_checkpoint(os.path.join(folder, ckpt_util.CHECKPOINT_NAME))
                    for folder in (str(out), runs["straight"]))
    assert ours["epoch"] == theirs["epoch"] == 1
    for key, value in theirs["model"].items():
        assert torch.equal(value, ours["model"][key]), key
    for index, state in theirs["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, ours["optimizer"]["state"][index][name]), (index, name)


def test_save_every_min_is_minutes_of_wall_clock(runs, tiny_data, tmp_path, monkeypatch, saved_positions):
    """One epoch of 12 steps of 10 s each (a clock that jumps forward 10 s at every
    optimizer step), a checkpoint due every minute: one or two time-triggered saves within
    the epoch, not one every few steps."""
    jump, step, monotonic = [0.0], torch.optim.AdamW.step, time.monotonic

    def ten_second_step(self, *args, **kwargs):
        jump[0] += 10.0
        return step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", ten_second_step)
    monkeypatch.setattr(time, "monotonic", lambda: monotonic() + jump[0])
    out = str(tmp_path / "run")
    main(train_argv(tiny_data, out, "--batch_size", 1, "--save_every_min", 1, "--num_workers", 0, epochs=1))
    timed = [position for position in saved_positions if position[1] > 0]  # not the epoch end
    assert 1 <= len(timed) <= 2, saved_positions


def test_evaluation_never_falls_back_to_the_previous_checkpoint(runs, tiny_data, tmp_path):
    """Training may resume from checkpoint-prev.pth when the last one is damaged (it says
    so); evaluation must not silently score other weights: it stops and names the file."""
    out = copy_of(runs, "straight", tmp_path)
    with open(os.path.join(out, ckpt_util.CHECKPOINT_NAME), "r+b") as f:
        f.truncate(100)
    for mode in ("--evaluate_nll", "--evaluate_gen"):
        with pytest.raises(SystemExit) as stop:
            main(["--model", "fractalmar_tiny", "--data_path", tiny_data, "--output_dir", tmp_path / "eval",
                  "--resume", out, "--device", "cpu", "--num_workers", 0, mode, "--num_images", 2])
        assert "checkpoint-prev.pth" in str(stop.value) and str(stop.value).startswith("error: "), mode
