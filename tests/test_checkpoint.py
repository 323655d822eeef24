"""Checkpoints: atomic writes, weights_only loads, official weights-only files, exact resume."""
import argparse
import datetime
import os

import pytest
import torch

from models import create_model
from util import checkpoint as ckpt_util
from util.misc import UserInputError


def test_save_is_atomic_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-last.pth")
    ckpt_util.save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 0}, path)
    real_save = torch.save

    def crash_mid_write(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:  # leave a half-written file behind, as a crash would
            fh.truncate(100)
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="No space left"):
        ckpt_util.save_checkpoint({"model": {"w": torch.full((3,), 2.0)}, "epoch": 1}, path)
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = ckpt_util.load_checkpoint(path)
    assert ckpt["epoch"] == 0 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"]  # no temp file left over


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
