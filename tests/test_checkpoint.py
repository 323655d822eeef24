"""Checkpoints: atomic writes, weights_only loads, official weights-only files, exact resume."""
import argparse
import datetime
import errno
import os

import pytest
import torch

from models import create_model
from util import checkpoint as ckpt_util
from util.misc import UserInputError


def test_disk_full_mid_write_keeps_the_previous_checkpoints_and_says_so(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-last.pth")
    ckpt_util.save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 0}, path, keep_previous=True)
    ckpt_util.save_checkpoint({"model": {"w": torch.full((3,), 2.0)}, "epoch": 1}, path, keep_previous=True)
    real_save = torch.save

    def disk_full_mid_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the disk, then it is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full_mid_write)
    with pytest.raises(UserInputError, match=r"cannot write .*checkpoint-last\.pth: no space left on the device; "
                                             r"free space there or pass --output_dir on another disk"):
        ckpt_util.save_checkpoint({"model": {"w": torch.full((3,), 3.0)}, "epoch": 2}, path, keep_previous=True)
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt_util.load_checkpoint(path)["epoch"] == 1
    assert ckpt_util.load_checkpoint(str(tmp_path / "checkpoint-prev.pth"))["epoch"] == 0
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-last.pth", "checkpoint-prev.pth"]  # no temp file


def test_a_real_full_device_gives_the_same_sentence(tmp_path):
    """The temp file is made a link to /dev/full, which fails every write with ENOSPC as a
    full disk does (no monkeypatching); removing the temp file removes only the link."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    path = str(tmp_path / "checkpoint-last.pth")
    ckpt_util.save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 0}, path)
    os.symlink("/dev/full", path + ".tmp")
    with pytest.raises(UserInputError, match=r"cannot write .*checkpoint-last\.pth: no space left on the device"):
        ckpt_util.save_checkpoint({"model": {"w": torch.zeros(100)}, "epoch": 1}, path, keep_previous=True)
    assert os.path.exists("/dev/full")
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"]
    assert ckpt_util.load_checkpoint(path)["epoch"] == 0


def test_unreadable_last_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    path = str(tmp_path / "checkpoint-last.pth")
    for epoch in (0, 1):
        ckpt_util.save_checkpoint({"model": {"w": torch.full((3,), float(epoch))}, "epoch": epoch}, path,
                                  keep_previous=True)
    with open(path, "r+b") as f:  # damaged after the fact (bad sector, partial copy)
        f.truncate(50)
    with pytest.raises(UserInputError, match=r"cannot read checkpoint .*; the previous checkpoint "
                                             r".*checkpoint-prev\.pth is there: pass --resume .*prev\.pth"):
        ckpt_util.load_latest_checkpoint(path, use_previous=False)
    ckpt, used = ckpt_util.load_latest_checkpoint(path, use_previous=True)
    assert ckpt["epoch"] == 0 and used.endswith("checkpoint-prev.pth")
    assert "resuming from the previous checkpoint" in capsys.readouterr().out
    os.remove(path)  # killed between the two renames of a save: only the previous one exists
    assert ckpt_util.load_latest_checkpoint(path, use_previous=True)[0]["epoch"] == 0


def test_stale_temp_files_are_reused_or_removed(tmp_path):
    path = str(tmp_path / "checkpoint-last.pth")
    for name in ("checkpoint-last.pth.tmp", "checkpoint-last.pth.tmp-12345", "keep.txt"):
        (tmp_path / name).write_bytes(b"x" * 10)
    assert sorted(ckpt_util.remove_stale_temp_files(str(tmp_path))) == ["checkpoint-last.pth.tmp",
                                                                         "checkpoint-last.pth.tmp-12345"]
    (tmp_path / "checkpoint-last.pth.tmp").write_bytes(b"x" * 10)  # a save reuses the temp name
    ckpt_util.save_checkpoint({"model": {}}, path)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-last.pth", "keep.txt"]


def test_background_writer_writes_a_copy_and_reports_errors_later(tmp_path, monkeypatch):
    writer = ckpt_util.CheckpointWriter(background=True)
    weights = torch.ones(1000)
    path = str(tmp_path / "checkpoint-last.pth")
    writer.save({"model": {"w": weights}, "epoch": 0}, path)
    weights.add_(1)  # training goes on changing the live tensors while the file is written
    writer.wait()
    assert torch.equal(ckpt_util.load_checkpoint(path)["model"]["w"], torch.ones(1000))
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EACCES, "denied")))
    writer.save({"model": {"w": weights}, "epoch": 1}, path)
    with pytest.raises(UserInputError, match=r"cannot write .*checkpoint-last\.pth: permission denied"):
        writer.wait()
    monkeypatch.undo()
    assert ckpt_util.load_checkpoint(path)["epoch"] == 0


class Payload:
    """Stands for arbitrary pickled code, which weights_only loading must refuse."""


def test_load_allows_namespace_and_refuses_other_classes(tmp_path):
    good = str(tmp_path / "good.pth")
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(model="fractalmar_in64", lr=1e-4)}, good)
    assert ckpt_util.load_checkpoint(good)["args"].model == "fractalmar_in64"
    assert ckpt_util.checkpoint_model_name(ckpt_util.load_checkpoint(good)) == "fractalmar_in64"

    for name, obj, message in [
        ("evil.pth", {"model": {}, "extra": Payload()}, r"refusing to load .*evil\.pth.*argparse\.Namespace"),
        ("date.pth", {"model": {}, "when": datetime.datetime(2025, 1, 1)}, r"refusing to load"),
        ("list.pth", [torch.zeros(1)], r"not a FractalGen checkpoint: expected a dict with a 'model' entry"),
    ]:
        torch.save(obj, tmp_path / name)
        with pytest.raises(UserInputError, match=message):
            ckpt_util.load_checkpoint(str(tmp_path / name))
    with open(tmp_path / "cut.pth", "wb") as f:
        f.write(open(good, "rb").read()[:200])
    with pytest.raises(UserInputError, match=r"cannot read checkpoint .*cut\.pth"):
        ckpt_util.load_checkpoint(str(tmp_path / "cut.pth"))
    with pytest.raises(UserInputError, match=r"no checkpoint at .*missing"):
        ckpt_util.load_checkpoint(str(tmp_path / "missing" / "checkpoint-last.pth"))


def test_weights_only_checkpoint_evaluates_like_an_official_one(run_main, tiny_data, tmp_path):
    """Official pretrained files hold just {'model': state_dict}; --resume also takes the file."""
    torch.manual_seed(0)
    model = create_model("fractalar_tiny", class_num=2)
    path = str(tmp_path / "pretrained.pth")
    torch.save({"model": model.state_dict()}, path)
    result = run_main("--model", "fractalar_tiny", "--data_path", tiny_data, "--output_dir", tmp_path / "eval",
                      "--resume", path, "--evaluate_nll", "--nll_bsz", 5, "--device", "cpu", "--num_workers", 0)
    assert result["nll"]["images"] == 5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in result["model"].state_dict().items())


def _train(run_main, data, out, epochs, resume=None):
    argv = ["--model", "fractalmar_tiny", "--data_path", data, "--output_dir", out, "--device", "cpu",
            "--batch_size", 4, "--epochs", epochs, "--warmup_epochs", 1, "--blr", 1e-2, "--label_drop_prob", 0.5,
            "--save_last_freq", 1, "--num_workers", 1, "--seed", 3]
    return run_main(*argv, *(["--resume", resume] if resume else []))


def test_resume_is_exact(run_main, tiny_data, tmp_path, capsys):
    """2 epochs straight == 1 epoch, resume, 1 more: same weights and optimizer state, bit for bit.
    (With one warm-up epoch the first epoch's lr does not depend on --epochs.) Random masks,
    label dropout, flips and DataLoader workers all draw from the per-epoch seeds."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    _train(run_main, tiny_data, straight, 2, resume=straight)  # the official idiom: --resume == --output_dir
    assert "no checkpoint-last.pth in" in capsys.readouterr().out  # a fresh start is announced, not silent
    _train(run_main, tiny_data, split, 1)
    first = ckpt_util.load_checkpoint(os.path.join(split, "checkpoint-last.pth"))
    _train(run_main, tiny_data, split, 2, resume=split)
    assert "continuing at epoch 1" in capsys.readouterr().out

    a = ckpt_util.load_checkpoint(os.path.join(straight, "checkpoint-last.pth"))
    b = ckpt_util.load_checkpoint(os.path.join(split, "checkpoint-last.pth"))
    assert a["epoch"] == b["epoch"] == 1
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert not all(torch.equal(v, first["model"][k]) for k, v in b["model"].items()), "epoch 2 must train"
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)
