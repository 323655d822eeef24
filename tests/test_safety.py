"""Crafted files run no code, and bad input stops with one sentence before any heavy work:
main_fractalgen.py, util.fid_stats and util.check_data."""
import builtins
import os

import numpy as np
import pytest
import torch
from PIL import Image

import main_fractalgen
from models import create_model
from util import check_data, fid_stats
from util.misc import UserInputError

pytestmark = pytest.mark.usefixtures("one_thread")


class OpensMarker:
    """Unpickling this calls open(path, "w"): it stands for any code a crafted file could run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return builtins.open, (self.path, "w")


@pytest.fixture
def crafted(tmp_path):
    """make(name, wrap) writes torch.save(wrap(payload)) and returns its path; `marker` is
    the file the payload creates when unpickled. The payload is shown to work first."""
    marker = tmp_path / "MARKER"

    def make(name, wrap):
        path = tmp_path / name
        torch.save(wrap(OpensMarker(str(marker))), path)
        torch.load(path, weights_only=False)  # the control: a full unpickle runs the payload
        assert marker.exists()
        marker.unlink()
        return str(path)
    make.marker = marker
    return make


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Training or generation starting is a test failure: the error must come before."""
    def started(*args, **kwargs):
        raise AssertionError("heavy work started before the bad input was found")
    monkeypatch.setattr(main_fractalgen, "train", started)
    monkeypatch.setattr(main_fractalgen, "evaluate_gen", started)
    monkeypatch.setattr(main_fractalgen, "evaluate_nll", started)


@pytest.fixture
def weights_checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "weights.pth"
    torch.save({"model": create_model("fractalar_tiny", class_num=2).state_dict()}, path)
    return str(path)


def _train_args(data, out, *extra):
    return ["--model", "fractalar_tiny", "--data_path", data, "--output_dir", out, "--device", "cpu",
            "--batch_size", 4, "--epochs", 1, "--num_workers", 0, *extra]


def _fails_with(run, argv, message):
    with pytest.raises(SystemExit) as err:
        run(*argv)
    text = str(err.value.code)
    assert text.startswith("error: ") and "\n" not in text, text
    assert "weights_only=False" not in text
    assert message in text, text
    return text


# ---------------------------------------------------------------- crafted pickles
CRAFTED_CHECKPOINT = {
    "resume_training": [],
    "evaluate_nll": ["--evaluate_nll"],
    "evaluate_gen": ["--evaluate_gen", "--num_images", 2],
}


@pytest.mark.parametrize("mode", CRAFTED_CHECKPOINT)
def test_crafted_checkpoint_runs_no_code(mode, crafted, run_main, no_heavy_work, tiny_data, fid_stats,
                                         inception_weights, tmp_path):
    evil = crafted("evil-checkpoint.pth", lambda payload: {"model": {}, "epoch": payload})
    out = str(tmp_path / "out")
    argv = _train_args(tiny_data, out, "--resume", evil, *CRAFTED_CHECKPOINT[mode],
                       "--fid_stats_path", fid_stats, "--inception_weights", inception_weights)
    text = _fails_with(run_main, argv, "refusing to load checkpoint")
    assert "io.open" in text  # names what the file references
    assert not crafted.marker.exists() and not os.path.exists(out)


@pytest.mark.parametrize("mode", ["evaluate_gen", "online_eval"])
def test_crafted_inception_weights_run_no_code_in_main(mode, crafted, run_main, no_heavy_work, tiny_data,
                                                       fid_stats, weights_checkpoint, tmp_path):
    evil = crafted("evil-inception.pth", lambda payload: {"fc.weight": payload})
    out = str(tmp_path / "out")
    extra = (["--evaluate_gen", "--resume", weights_checkpoint] if mode == "evaluate_gen" else ["--online_eval"])
    argv = _train_args(tiny_data, out, *extra, "--num_images", 2, "--fid_stats_path", fid_stats,
                       "--inception_weights", evil)
    _fails_with(run_main, argv, "refusing to load Inception weights")
    assert not crafted.marker.exists() and not os.path.exists(out)


def test_crafted_inception_weights_run_no_code_in_fid_stats(crafted, tiny_data, tmp_path):
    evil = crafted("evil-inception.pth", lambda payload: {"fc.weight": payload})
    out = tmp_path / "stats.npz"
    argv = ["--images", os.path.join(tiny_data, "val"), "--out", str(out), "--device", "cpu",
            "--num_workers", "0", "--inception_weights", evil]
    _fails_with(lambda *a: fid_stats.main(list(a)), argv, "refusing to load Inception weights")
    assert not crafted.marker.exists() and not out.exists()


# ---------------------------------------------------------------- bad input, early
def _bad_stats(tmp_path, kind):
    path = tmp_path / f"{kind}.npz"
    if kind == "shape":
        np.savez(path, mu=np.zeros(10), sigma=np.eye(10))
    elif kind == "nan":
        sigma = np.eye(2048)
        sigma[3, 5] = np.nan
        np.savez(path, mu=np.zeros(2048), sigma=sigma)
    else:
        path.write_bytes(b"PK\x03\x04 not really a zip")
    return str(path)


def _bad_weights(tmp_path, inception_weights, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "shape":
        state = torch.load(inception_weights, weights_only=True)
        state["fc.weight"] = state["fc.weight"][:10]
        torch.save(state, path)
    else:
        torch.save([torch.zeros(3)], path)
    return str(path)


BAD_INPUT = {
    # flags, message
    "temperature_nan": (["--temperature", "nan"], "--temperature must be a finite number above 0, got nan"),
    "temperature_0": (["--temperature", "0"], "--temperature must be a finite number above 0, got 0"),
    "cfg_negative": (["--cfg", "-3"], "--cfg must be a finite number of 0 or more, got -3"),
    "cfg_inf": (["--cfg", "inf"], "--cfg must be a finite number of 0 or more, got inf"),
    "lr_nan": (["--lr", "nan"], "--lr must be a finite number above 0, got nan"),
    "blr_0": (["--blr", "0"], "--blr must be a finite number above 0, got 0"),
    "device_name": (["--device", "gpu7"], "--device 'gpu7' is not a device name; use cpu, cuda or cuda:N"),
    "stats_shape": (["--online_eval", "--fid_stats_path", "STATS:shape"],
                    "expected Inception statistics mu (2048,) and sigma (2048, 2048), got (10,) and (10, 10)"),
    "stats_nan": (["--online_eval", "--fid_stats_path", "STATS:nan"], "mu or sigma holds NaN or infinite values"),
    "stats_garbage": (["--online_eval", "--fid_stats_path", "STATS:garbage"], "cannot read FID statistics"),
    "weights_shape": (["--online_eval", "--inception_weights", "WEIGHTS:shape"],
                      "does not fit torch-fidelity's Inception-v3 (size mismatch for fc.weight"),
    "weights_list": (["--online_eval", "--inception_weights", "WEIGHTS:list"], "is not an Inception state_dict"),
}


@pytest.mark.parametrize("kind", BAD_INPUT)
def test_bad_input_is_one_sentence_before_any_heavy_work(kind, run_main, no_heavy_work, tiny_data, fid_stats,
                                                          inception_weights, tmp_path):
    flags, message = BAD_INPUT[kind]
    fid_flags = {"--fid_stats_path": fid_stats, "--inception_weights": inception_weights}
    for i, flag in enumerate(flags[:-1]):
        value = flags[i + 1]
        if flag in fid_flags:
            fid_flags[flag] = (_bad_stats(tmp_path, value[6:]) if value.startswith("STATS:") else
                               _bad_weights(tmp_path, inception_weights, value[8:]))
    flags = [f for f in flags if f not in fid_flags and not f.startswith(("STATS:", "WEIGHTS:"))]
    out = str(tmp_path / "out")
    fid = [x for pair in fid_flags.items() for x in pair]
    _fails_with(run_main, _train_args(tiny_data, out, *flags, "--num_images", 2, *fid), message)
    assert not os.path.exists(out)


# every flag value the reliability probe found giving a traceback or passing silently
# (_train_args uses the AR model, which ignores the dropout flags: they are checked anyway)
BAD_FLAGS = {
    "seed -1": (["--seed", "-1"], "--seed must be at least 0, got -1"),
    "seed 2**70": (["--seed", str(2 ** 70)], f"--seed must be at most {2 ** 63 - 1} (torch seeds are 64-bit"),
    "start_epoch -1": (["--start_epoch", "-1"], "--start_epoch must be at least 0, got -1"),
    "warmup_epochs -1": (["--warmup_epochs", "-1"], "--warmup_epochs must be at least 0, got -1"),
    "epochs 2**70": (["--epochs", str(2 ** 70)], "--epochs must be at most 2147483647 (a C int)"),
    "num_workers 2**70": (["--num_workers", str(2 ** 70)], f"--num_workers {2 ** 70} is more worker processes than "
                                                           f"this machine can use"),
    "device mps": (["--device", "mps"], "--device mps: this build of torch cannot use MPS"),
    "device cpu:3": (["--device", "cpu:3"], "--device cpu:3: the CPU takes no device number; pass --device cpu"),
    "attn_dropout nan": (["--attn_dropout", "nan"], "--attn_dropout must be a number in [0, 1), "
                                                     "got nan"),
    "proj_dropout nan": (["--proj_dropout", "nan"], "--proj_dropout must be a number in [0, 1)"),
    "attn_dropout 1.5": (["--attn_dropout", "1.5"], "--attn_dropout must be a number in [0, 1)"),
    "proj_dropout -1": (["--proj_dropout", "-1"], "--proj_dropout must be a number in [0, 1)"),
    "label_drop_prob nan": (["--label_drop_prob", "nan"], "--label_drop_prob must be a number in [0, 1]"),
    "label_drop_prob inf": (["--label_drop_prob", "inf"], "--label_drop_prob must be a number in [0, 1]"),
    "label_drop_prob -1": (["--label_drop_prob", "-1"], "--label_drop_prob must be a number in [0, 1]"),
    "label_drop_prob 1.5": (["--label_drop_prob", "1.5"], "--label_drop_prob must be a number in [0, 1]"),
    "r_weight -1": (["--r_weight", "-1"], "--r_weight must be a finite number above 0, got -1"),
    "r_weight 0": (["--r_weight", "0"], "--r_weight must be a finite number above 0, got 0"),
    "r_weight nan": (["--r_weight", "nan"], "--r_weight must be a finite number above 0, got nan"),
    "save_every_min 1e308": (["--save_every_min", "1e308"], "--save_every_min must be a number in [0, 525600]"),
    "dist_timeout 1e-9": (["--dist_timeout", "1e-9"], "--dist_timeout must be a number in [0.0001, 1e+08]"),
    "dist_timeout 1e30": (["--dist_timeout", "1e30"], "--dist_timeout must be a number in [0.0001, 1e+08]"),
    "lr 1e308": (["--lr", "1e308"], "--lr must be at most 1"),
    "blr makes lr > 1": (["--blr", "0.9", "--batch_size", "1024"], "the learning rate 3.6 (--blr 0.9 x effective "
                                                                   "batch 1024 / 256) must be at most 1"),
    "weight_decay 1e308": (["--weight_decay", "1e308"], "--weight_decay 1e+308 with learning rate 7.8125e-07 (--blr "
                                                        "5e-05 x effective batch 4 / 256) would multiply every weight"),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_flags_are_one_sentence_before_anything_is_written(case, run_main, no_heavy_work, tiny_data, tmp_path):
    flags, message = BAD_FLAGS[case]
    out = str(tmp_path / "out")
    _fails_with(run_main, _train_args(tiny_data, out, *flags), message)
    assert not os.path.exists(out)


def test_worker_counts_are_bounded_by_the_cores_before_any_worker_starts(run_main, no_heavy_work, tiny_data, tmp_path,
                                                                        monkeypatch, capsys):
    """--num_workers 2**70 once forked DataLoader workers until memory ran out. Every flag
    that starts worker processes is bounded by the cores (4 each, at least 16). With one
    core here the bound is 16, and 17 is refused: a value that would start no storm even
    if a check were gone."""
    from util import sweep, validation
    monkeypatch.setattr(validation, "usable_cpus", lambda: 1)
    assert validation.worker_count("--num_workers", 16) == 16
    monkeypatch.setattr(validation, "usable_cpus", lambda: 8)
    assert validation.worker_count("--num_workers", 32) == 32  # 4 per core above the floor
    with pytest.raises(UserInputError, match="^--num_workers 33 is more worker processes than this machine can use: "
                                             r"it gives this process 8 CPU core\(s\), so at most 32 \(each worker is "
                                             r"a process with its own memory\); pass --num_workers 8$"):
        validation.worker_count("--num_workers", 33)
    monkeypatch.setattr(validation, "usable_cpus", lambda: 1)
    out = str(tmp_path / "out")
    _fails_with(run_main, _train_args(tiny_data, out, "--num_workers", 17), "--num_workers 17 is more worker "
                "processes than this machine can use: it gives this process 1 CPU core(s), so at most 16")
    assert not os.path.exists(out)
    stats = str(tmp_path / "stats.npz")
    _fails_with(lambda *a: fid_stats.main(list(a)), ["--images", tiny_data, "--out", stats, "--num_workers", "17"],
                "--num_workers 17 is more worker processes")
    _fails_with(lambda *a: sweep.main(list(a)), ["--resume", str(tmp_path), "--fid_stats_path", stats,
                                                 "--num_workers", "17"], "--num_workers 17 is more worker processes")
    assert not os.path.exists(stats)
    capsys.readouterr()
    assert check_data.main([tiny_data, "--workers", "17"]) == 2
    assert "error: --workers 17 is more worker processes than this machine can use" in capsys.readouterr().err


def test_fid_files_are_needed_only_when_fid_is_computed(run_main, monkeypatch, tiny_data, tmp_path):
    monkeypatch.setattr(main_fractalgen, "train", lambda *args: {})
    missing = str(tmp_path / "missing")
    result = run_main(*_train_args(tiny_data, str(tmp_path / "out"), "--fid_stats_path", missing + ".npz",
                                   "--inception_weights", missing + ".pth"))
    assert result["train"] == {}


@pytest.mark.parametrize("flags, message", [
    (["--device", "nonsense"], "--device 'nonsense' is not a device name"),
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--inception_weights", "WEIGHTS:shape"], "does not fit torch-fidelity's Inception-v3"),
])
def test_fid_stats_checks_flags_and_weights_before_reading_images(flags, message, inception_weights, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(b"not a png")  # reading it would be the wrong error
    if flags[-1] == "WEIGHTS:shape":
        flags = [flags[0], _bad_weights(tmp_path, inception_weights, "shape")]
    else:
        flags = [*flags, "--inception_weights", inception_weights]
    argv = ["--images", str(images), "--out", str(tmp_path / "s.npz"), "--num_workers", "0", *flags]
    _fails_with(lambda *a: fid_stats.main(list(a)), argv, message)


# ---------------------------------------------------------------- python -m util.check_data
def test_check_data_lists_every_unreadable_image(tmp_path, capsys):
    root = tmp_path / "data"
    for split, count in (("train", 3), ("val", 2)):
        (root / split / "cat").mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / split / "cat" / f"{i}.png")
    good = (root / "train" / "cat" / "0.png").read_bytes()
    (root / "train" / "cat" / "truncated.png").write_bytes(good[:len(good) // 2])
    (root / "val" / "cat" / "garbage.JPG").write_bytes(b"garbage")
    (root / "train" / "notes.txt").write_text("not an image, not loaded by ImageFolder")

    assert check_data.main([str(root), "--workers", "2"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[:2] == [f"{root / split} holds 1 class folder" for split in ("train", "val")]  # as training sees it
    lines = lines[2:]
    assert len(lines) == 3
    assert "truncated.png" in lines[0] and "garbage.JPG" in lines[1]
    assert "checked 7 images" in lines[2] and "2 unreadable" in lines[2]

    (root / "train" / "cat" / "truncated.png").unlink()
    (root / "val" / "cat" / "garbage.JPG").unlink()
    assert check_data.main([str(root), "--workers", "1"]) == 0
    assert "checked 5 images" in capsys.readouterr().out
    assert check_data.main([str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
