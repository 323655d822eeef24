"""What a new user meets in the first hour (issue 12): the quick start's hints and --fresh,
demo/sample.py's flag checks, models.load_model on every kind of checkpoint, sampling
settings stored with a checkpoint, progress output in log files, timm's Mlp, --help."""
import argparse
import os
import subprocess
import sys

import pytest
import timm.layers
import torch

import main_fractalgen
from demo import quickstart, sample
from models import DEFAULT_SAMPLING, create_model, load_model
from models.layers import Block
from util.checkpoint import save_checkpoint
from util.misc import UserInputError
from util.progress import progress_bar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "fractalar_tiny"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per test


def tiny_state(name=TINY, class_num=4, seed=0):
    torch.manual_seed(seed)
    return create_model(name, class_num=class_num).state_dict()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint as main_fractalgen.py writes it (official layout, args a Namespace)."""
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-last.pth"
    torch.save({"model": tiny_state(), "epoch": 3, "args": argparse.Namespace(model=TINY, class_num=4)}, path)
    return str(path)


# ---------------------------------------------------------------------- quick start hints and --fresh
def hint_commands(argv, tmp_path):
    args = quickstart.get_args_parser().parse_args(argv)
    out = os.path.abspath(args.out)
    return [line for line in quickstart.next_steps(args, out, os.path.join(out, "data"), os.path.join(out, "train"))
            if not line.startswith("#")]


def test_rerun_hint_keeps_every_option_the_user_gave(tmp_path):
    out = str(tmp_path / "qs mar")  # a space: the hint must quote it
    lines = hint_commands(["--model", "fractalmar_tiny", "--out", out, "--epochs", "4", "--num_classes", "3",
                           "--cfg", "1.5"], tmp_path)
    rerun = next(line for line in lines if "quickstart.py" in line)
    words = __import__("shlex").split(rerun)
    assert words[words.index("--model") + 1] == "fractalmar_tiny"
    assert words[words.index("--out") + 1] == out
    assert words[words.index("--num_classes") + 1] == "3" and words[words.index("--cfg") + 1] == "1.5"
    assert words[words.index("--epochs") + 1] == "8" and words.count("--epochs") == 1
    assert words[-1] == "--fresh" and words.count("--fresh") == 1
    assert "--seed" not in words  # defaults are not repeated


def test_hints_are_single_spaced_commands_with_the_users_paths(tmp_path):
    lines = hint_commands(["--out", str(tmp_path / "q")], tmp_path)
    assert lines and all("  " not in line and "\\" not in line for line in lines)
    sample_lines = [line for line in lines if "sample.py" in line]
    assert len(sample_lines) == 2
    for line in sample_lines:  # their outputs go into OUT, not into the current folder
        words = line.split()
        assert words[words.index("--output") + 1].startswith(str(tmp_path / "q"))
        assert os.path.isfile(words[1])  # the script path works from the current folder


def test_fresh_removes_only_the_training_outputs(tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    written = ["checkpoint-last.pth", "checkpoint-last.pth.tmp-123", "log.txt", "events.out.tfevents.1.host"]
    for name in written:
        (train / name).write_text("x")
    (train / "my_notes.txt").write_text("keep me")
    (train / "sub").mkdir()
    quickstart.remove_training_outputs(str(train))
    assert sorted(os.listdir(train)) == ["my_notes.txt", "sub"]


def test_quickstart_refuses_a_folder_holding_another_run(tmp_path, ckpt):
    train = tmp_path / "train"
    train.mkdir()
    other = {"model": tiny_state(), "args": argparse.Namespace(model="fractalmar_in64", data_path="/data/imagenet")}
    torch.save(other, train / "checkpoint-last.pth")
    before = sorted(os.listdir(train))
    with pytest.raises(SystemExit, match="not written by the quick start") as e:
        quickstart.main(["--out", str(tmp_path), "--fresh", "--device", "cpu"])
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(train)) == before and not (tmp_path / "data").exists()


# ---------------------------------------------------------------------- demo/sample.py flag checks
BAD_FLAGS = [
    (["--labels", "cat"], "--labels"),
    (["--num_per_label", "0"], "--num_per_label"),
    (["--mask_frac", "5"], "--mask_frac"),
    (["--num_iter_list", "4,4,4"], "--num_iter_list"),
    (["--num_iter_list", "x"], "--num_iter_list"),
    (["--num_iter_list", "0,4"], "--num_iter_list"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "0"], "--temperature"),
    (["--cfg", "-3"], "--cfg"),
    (["--device", "tpu"], "--device"),
    (["--task", "edit", "--input", "DIR"], "is a folder"),
    (["--output", "OUT/samples"], "end the name in .png"),
    (["--ckpt", "PRETRAINED/fractalmar_in64"], "--download"),
    (["--ckpt", "fractalmar_in64"], "--download"),
]


@pytest.mark.parametrize("flags, named", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_sample_bad_input_is_one_line_and_writes_nothing(ckpt, tmp_path, monkeypatch, flags, named):
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)  # a default or relative output would land here
    flags = [f.replace("DIR", str(tmp_path)).replace("OUT", str(out)).replace("PRETRAINED", str(tmp_path / "pm"))
             for f in flags]
    argv = ["--ckpt", ckpt, "--output", str(out / "s.png"), "--gif", str(out / "s.gif"), *flags]
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    message = str(e.value)
    assert message.startswith("error: ") and named in message and "\n" not in message
    assert "weights_only=False" not in message
    assert sorted(os.listdir(tmp_path)) == ["out"] or sorted(os.listdir(tmp_path)) == []
    assert not out.exists()


def test_sample_cli_exit_code_and_no_traceback(ckpt, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "demo", "sample.py"), "--ckpt", ckpt,
                             "--labels", "cat", "--output", str(tmp_path / "s.png")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


def test_sample_default_output_is_git_ignored(ckpt, tmp_path, monkeypatch):
    assert sample.get_args_parser().get_default("output").startswith("outputs/")
    if not os.path.isdir(os.path.join(REPO, ".git")) and not os.path.isfile(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "outputs/samples.png", "samples.png", "gen.gif"],
                             capture_output=True, text=True, cwd=REPO).stdout.split()
    assert ignored == ["outputs/samples.png", "samples.png", "gen.gif"]


def test_sample_progress_in_a_log_is_whole_lines(ckpt, tmp_path, capsys):
    sample.main(["--ckpt", ckpt, "--labels", "0", "--num_iter_list", "4,2", "--output", str(tmp_path / "s.png")])
    err = capsys.readouterr().err
    assert "\r" not in err
    last = [line for line in err.splitlines() if line.startswith("sampling:")][-1]
    done, total = last.split("|")[2].split()[0].split("/")
    assert "100%" in last and done == total  # one line per update, the last one complete


def test_progress_bar_writes_lines_to_files_and_redraws_on_terminals(tmp_path):
    with open(tmp_path / "log.txt", "w") as f:
        for _ in progress_bar(range(3), desc="steps", file=f, log_interval=0):
            pass
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert "\r" not in (tmp_path / "log.txt").read_text()
    assert [line.split("|")[0].split()[-1] for line in lines] == ["0%", "33%", "67%", "100%"]

    class Terminal(list):
        def write(self, s):
            self.append(s)

        def flush(self):
            pass

        def isatty(self):
            return True

    term = Terminal()
    for _ in progress_bar(range(3), desc="steps", file=term, mininterval=0):
        pass
    assert any("\r" in s for s in term)  # a terminal gets the redrawn bar


# ---------------------------------------------------------------------- models.load_model
def test_load_model_official_layout_training_run_and_quickstart(tmp_path):
    # an official file: args is the full training Namespace, 1000 classes, optimizer state
    official = tmp_path / "pretrained_models" / TINY / "checkpoint-last.pth"
    official.parent.mkdir(parents=True)
    args = argparse.Namespace(model=TINY, class_num=1000, num_conds=1, guiding_pixel=False, img_size=16,
                              output_dir="/checkpoint/run", epochs=800, cfg=1.0, temperature=1.0)
    torch.save({"model": tiny_state(class_num=1000, seed=1), "optimizer": {"state": {}, "param_groups": []},
                "epoch": 799, "scaler": {}, "args": args}, official)
    model = load_model(str(official.parent))
    assert (model.model_name, model.class_num, model.training) == (TINY, 1000, False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in tiny_state(class_num=1000, seed=1).items())
    assert model.sampling_config() == {**DEFAULT_SAMPLING[TINY], "num_iter_list": (16, 16)}
    # bare weights in the pretrained_models/<name>/ layout, and the name alone
    torch.save({"model": tiny_state(class_num=1000, seed=1)}, official)
    assert load_model(TINY, root=str(tmp_path / "pretrained_models")).class_num == 1000
    # a quick-start checkpoint: 4 classes, its own sampling settings
    qs = tmp_path / "qs" / "checkpoint-last.pth"
    stored = dict(num_iter_list=(4, 2), cfg=3.0, cfg_schedule="constant", temperature=1.5, filter_threshold=1e-3)
    save_checkpoint({"model": tiny_state(name="fractalmar_tiny"), "epoch": 1, "sampling": stored,
                     "args": argparse.Namespace(model="fractalmar_tiny", class_num=4, num_conds=None)}, str(qs))
    model = load_model(str(qs))
    assert (model.model_name, model.class_num) == ("fractalmar_tiny", 4)
    assert model.sampling_config() == stored


def test_load_model_is_strict_and_names_class_num(tmp_path):
    state = tiny_state()
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save({"model": state, "args": argparse.Namespace(model=TINY)}, path)
    with pytest.raises(UserInputError, match="unexpected key"):
        load_model(str(path))
    model = create_model(TINY)  # 1000 classes: the README snippet's mistake with a 4-class checkpoint
    with pytest.raises(ValueError, match="class_num"):
        model.load_state_dict(tiny_state())


def test_generate_uses_the_stored_sampling_settings(tmp_path):
    stored = dict(num_iter_list=(4, 2), cfg=3.0, cfg_schedule="linear", temperature=1.7, filter_threshold=1e-4)
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": tiny_state(), "sampling": stored, "args": argparse.Namespace(model=TINY)}, path)
    model = load_model(str(path))
    torch.manual_seed(0)
    implicit = model.generate([0, 1])
    torch.manual_seed(0)
    explicit = model.generate([0, 1], **stored)
    torch.manual_seed(0)
    plain = model.generate([0, 1], num_iter_list=(4, 2), cfg=1.0, temperature=1.0)
    assert torch.equal(implicit, explicit) and not torch.equal(implicit, plain)


def test_a_stored_bad_sampling_entry_is_refused(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": tiny_state(), "sampling": {"temperature": float("nan")},
                "args": argparse.Namespace(model=TINY)}, path)
    with pytest.raises(UserInputError, match="temperature"):
        load_model(str(path))


class WritesMarker:
    """Unpickling this runs `open(marker, 'w')` -- what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_pickle_runs_nothing(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": tiny_state(), "payload": WritesMarker(str(marker))}, path)
    with pytest.raises(UserInputError) as e:
        load_model(str(path), TINY)
    assert "weights_only=False" not in str(e.value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(path), "--model", TINY, "--output", str(tmp_path / "s.png")])
    assert "refusing to load" in str(e.value) and "weights_only=False" not in str(e.value)
    assert not marker.exists() and not (tmp_path / "s.png").exists()


# ---------------------------------------------------------------------- timm, --help, --threads
def test_blocks_use_timms_mlp_with_the_same_numbers():
    torch.manual_seed(0)
    block = Block(32, 4)
    assert isinstance(block.mlp, timm.layers.Mlp)
    assert [k for k in block.state_dict() if k.startswith("mlp.")] == [
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    assert isinstance(block.mlp.act, torch.nn.GELU) and block.mlp.act.approximate == "none"
    x = torch.randn(2, 5, 32)
    block.eval()
    reference = block.mlp.fc2(torch.nn.functional.gelu(block.mlp.fc1(x)))
    assert torch.equal(block.mlp(x), reference)
    assert torch.equal(timm.layers.Mlp.forward(block.mlp, x), reference)  # the fast eval path is timm's


def test_main_help_shows_defaults_and_threads_applies(tmp_path):
    text = main_fractalgen.get_args_parser().format_help()
    assert "default: 400" in text and "(default: 5e-05)" in text and "--threads" in text
    torch.set_num_threads(2)
    args = main_fractalgen.get_args_parser().parse_args(
        ["--model", TINY, "--threads", "1", "--evaluate_nll", "--data_path", str(tmp_path), "--device", "cpu"])
    with pytest.raises(SystemExit):  # no val/ folder: stops before any heavy work, threads already set
        main_fractalgen.main(args)
    assert torch.get_num_threads() == 1
    with pytest.raises(SystemExit):  # refused by the parser, in one line
        main_fractalgen.get_args_parser().parse_args(["--model", TINY, "--threads", "0", "--device", "cpu"])


def test_requirements_install_jupyter_and_timm():
    with open(os.path.join(REPO, "requirements.txt")) as f:
        names = {line.split("=")[0].split(">")[0].split("<")[0].strip().lower() for line in f
                 if line.strip() and not line.startswith("#")}
    assert {"notebook", "timm", "tqdm"} <= names
