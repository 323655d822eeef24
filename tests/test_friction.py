"""The second round of first-hour friction (issue 18): --threads everywhere images are
made, an interrupted quick start, upscaling and memory checks before training, hints,
one-line flag mistakes, --ckpt errors, pip install, known images in any layout, --help,
--num_workers, the --fast notice."""
import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import main_fractalgen
from demo import quickstart, sample
from models import FractalGen, create_model, load_model
from util import cli, memory
from util import data as data_util
from util.checkpoint import load_checkpoint, save_checkpoint
from util.masks import make_mask
from util.visualize import load_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "fractalar_tiny"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder like the quick start's OUT/train: a checkpoint main_fractalgen.py wrote
    (4 classes), with stored sampling settings."""
    folder = tmp_path_factory.mktemp("qs") / "train"
    folder.mkdir()
    torch.manual_seed(0)
    state = create_model(TINY, class_num=4).state_dict()
    save_checkpoint({"model": state, "epoch": 0, "args": argparse.Namespace(model=TINY, class_num=4),
                     "sampling": {"num_iter_list": (4, 4), "cfg": 2.0, "temperature": 2.0}},
                    str(folder / "checkpoint-last.pth"))
    return folder


def write_images(root, size, per_class=(4, 4)):
    rng = np.random.default_rng(0)
    for c, n in enumerate(per_class):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                os.path.join(root, f"class{c}", f"{i}.png"))


# ---------------------------------------------------------------------- 1. --threads
@pytest.mark.parametrize("cores, load, processes, torch_threads, expected", [
    (2, 8.0, 1, 2, 1),     # a busy 2-core machine: one thread
    (2, 0.1, 1, 2, 2),     # idle: both cores
    (16, 4.2, 1, 16, 12),  # 16 cores, 4 busy
    (16, 0.0, 4, 16, 4),   # torchrun --nproc_per_node 4: a quarter each
    (16, 0.0, 1, 3, 3),    # never above torch's own setting (OMP_NUM_THREADS)
])
def test_auto_threads_takes_the_free_cores(monkeypatch, cores, load, processes, torch_threads, expected):
    monkeypatch.setattr(cli, "usable_cores", lambda: cores)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    torch.set_num_threads(torch_threads)
    assert cli.auto_threads(processes) == expected


def test_threads_flag_in_every_entry_point_that_makes_images():
    assert main_fractalgen.get_args_parser().parse_args([]).threads == "auto"
    assert sample.get_args_parser().parse_args(["--ckpt", "x"]).threads == "auto"
    assert sample.get_args_parser().parse_args(["--ckpt", "x", "--threads", "3"]).threads == 3
    assert quickstart.get_args_parser().parse_args([]).threads == 1  # the tiny model gains nothing from more
    with open(os.path.join(REPO, "demo", "run_fractalgen.ipynb")) as f:
        assert 'cli.set_threads(os.environ.get(\\"FRACTALGEN_THREADS\\", \\"auto\\")' in f.read()


def test_sample_sets_the_threads(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(2)
    sample.main(["--ckpt", str(trained), "--labels", "0", "--threads", "1", "--output", "s.png"])
    assert torch.get_num_threads() == 1 and (tmp_path / "s.png").exists()
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(trained), "--threads", "0"])
    assert "argument --threads: must be a positive number of threads or auto" in capsys.readouterr().err


def test_ctrl_c_in_sample_is_one_line_and_writes_nothing(trained, tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "save_grid", interrupt)  # Ctrl-C after sampling, before the grid is written
    threads = torch.get_num_threads()
    try:  # a KeyboardInterrupt that got through would stop pytest itself: catch it to fail this test
        sample.main(["--ckpt", str(trained), "--labels", "0", "--threads", "1", "--output", str(tmp_path / "s.png")])
        raised = None
    except BaseException as e:
        raised = e
    err = capsys.readouterr().err.strip()
    assert isinstance(raised, SystemExit) and raised.code == 130 and err.splitlines()[-1].startswith("interrupted (Ctrl-C)") and "Traceback" not in err
    assert not (tmp_path / "s.png").exists()
    torch.set_num_threads(threads)  # --threads 1 set them


def test_quickstart_hints_carry_threads_and_a_new_seed(tmp_path):
    args = quickstart.get_args_parser().parse_args(["--out", str(tmp_path / "q"), "--threads", "2", "--seed", "5"])
    lines = quickstart.next_steps(args, str(tmp_path / "q"), str(tmp_path / "q" / "data"), str(tmp_path / "q" / "train"))
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    sampling = [words for words in commands if any(w.endswith("sample.py") for w in words)]
    assert len(sampling) == 2
    for words in sampling:
        assert words[words.index("--threads") + 1] == "2"
    more = sampling[0]
    assert more[more.index("--seed") + 1] != "5"  # not the images samples.png already shows
    assert any("FRACTALGEN_THREADS=2" in line for line in lines)
    train = quickstart.train_args(args, str(tmp_path / "d"), str(tmp_path / "t"))
    assert str(train[train.index("--threads") + 1]) == "2"


# ---------------------------------------------------------------------- 2. Ctrl-C in the quick start
QS_SMALL = ["--num_train_per_class", "8", "--num_val_per_class", "1", "--samples_per_class", "1", "--device", "cpu"]


def test_interrupted_training_keeps_the_outputs_and_names_the_quickstart(tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "samples.png").write_bytes(b"last good")

    def stopped(args):
        assert not (args.evaluate_nll or args.evaluate_gen)  # stopped in training, before evaluation
        return {"args": args, "stopped": {"epoch": 3, "step": 2, "steps": 4, "signal": "SIGINT",
                                          "checkpoint": str(out / "train" / "checkpoint-last.pth")}}

    monkeypatch.setattr(main_fractalgen, "main", stopped)
    with pytest.raises(SystemExit) as e:
        quickstart.main(["--out", str(out), "--epochs", "7", "--fresh", *QS_SMALL])
    assert e.value.code == 130
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training stopped after step 2 of 4 in epoch 3" in message and "still those of the last" in message
    rerun = shlex.split(message.split("To continue, run: ")[1])
    assert rerun[1].endswith("demo/quickstart.py") and "--fresh" not in rerun
    assert rerun[rerun.index("--epochs") + 1] == "7" and rerun[rerun.index("--out") + 1] == str(out)
    assert (out / "samples.png").read_bytes() == b"last good"


def test_ctrl_c_while_sampling_writes_none_of_the_outputs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    quickstart.main(["--out", str(out), "--epochs", "1", *QS_SMALL])
    before = {name: (out / name).read_bytes() for name in ("samples.png", "generation.gif", "conditional.png")}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(quickstart, "make_conditional", interrupt)  # after the samples are made
    monkeypatch.setattr(quickstart, "make_samples", lambda *a: (torch.zeros(4, 3, 16, 16, dtype=torch.uint8), []))
    with pytest.raises(SystemExit) as e:
        quickstart.main(["--out", str(out), "--epochs", "1", *QS_SMALL])
    assert e.value.code == 130 and "quick start interrupted" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in before} == before


def test_sigint_during_quickstart_training(tmp_path):
    """A real Ctrl-C (SIGINT to the process) in the middle of training."""
    out = tmp_path / "q"
    script = os.path.join(REPO, "demo", "quickstart.py")
    subprocess.run([sys.executable, script, "--out", str(out), "--epochs", "1", *QS_SMALL], check=True,
                   capture_output=True, timeout=600)
    samples = (out / "samples.png").read_bytes()
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, script, "--out", str(out), "--epochs", "400", "--fresh", *QS_SMALL],
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "Epoch: [1]" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=300) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "quick start interrupted: training stopped after step" in text and "Traceback" not in text
    assert "To continue, run: " in text and "--fresh" not in text.split("To continue, run: ")[-1]
    assert "3/4" not in text  # neither evaluated nor sampled
    assert (out / "samples.png").read_bytes() == samples
    assert load_checkpoint(str(out / "train" / "checkpoint-last.pth"))["train_state"]["step"] > 0


# ---------------------------------------------------------------------- 3. upscaling, memory
def test_training_warns_before_upscaling(tmp_path, capsys):
    data = tmp_path / "data"
    write_images(str(data / "train"), 8)
    args = main_fractalgen.get_args_parser().parse_args(
        ["--model", TINY, "--data_path", str(data), "--output_dir", str(tmp_path / "out"), "--epochs", "1",
         "--batch_size", "4", "--num_workers", "0", "--device", "cpu"])
    main_fractalgen.main(args)
    text = capsys.readouterr().out
    assert "smaller than the model's 16x16 (short side 8 pixels), so each is upscaled about 2x" in text
    assert text.index("upscaled") < text.index("Epoch: [0]")


def test_no_upscaling_warning_for_images_large_enough(tiny_data, tmp_path, capsys):
    args = main_fractalgen.get_args_parser().parse_args(
        ["--model", TINY, "--data_path", tiny_data, "--output_dir", str(tmp_path / "out"), "--epochs", "1",
         "--batch_size", "4", "--num_workers", "0", "--device", "cpu"])
    main_fractalgen.main(args)
    assert "upscaled" not in capsys.readouterr().out


@pytest.mark.parametrize("size, warned", [(8, True), (15, True), (16, False), (40, False)])
def test_upscaling_warning_only_for_images_smaller_than_the_model(tmp_path, size, warned):
    from torchvision import datasets
    write_images(str(tmp_path), size)
    warning = data_util.upscaling_warning(datasets.ImageFolder(str(tmp_path)), 16, suggest=lambda side: [TINY])
    assert (warning is not None) == warned
    if warned:
        assert f"short side {size} pixels" in warning and f"({TINY}) fits them" in warning


def test_training_that_cannot_fit_is_refused_in_one_line_and_writes_nothing(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: 2 * memory.MB)
    out = tmp_path / "out"
    argv = ["--model", TINY, "--data_path", tiny_data, "--output_dir", str(out), "--epochs", "1", "--batch_size", "4",
            "--num_workers", "0", "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        main_fractalgen.main(main_fractalgen.get_args_parser().parse_args(argv))
    message = str(e.value)
    assert re.match(r"error: training --model fractalar_tiny at --batch_size 4 needs about \d+ MB of memory, but "
                    r"2 MB are available on cpu; .*--no_memory_check", message) and "\n" not in message
    assert not out.exists()
    main_fractalgen.main(main_fractalgen.get_args_parser().parse_args(argv + ["--no_memory_check"]))
    assert (out / "checkpoint-last.pth").exists()


def test_memory_estimate_leaves_the_random_stream_and_the_model_alone():
    torch.manual_seed(0)
    model = create_model("fractalmar_tiny", class_num=2).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    memory.training_memory(model, 8, torch.device("cpu"))
    drawn = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), drawn)
    assert not model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(level.generator.fixed_masking is None for level in model.levels() if hasattr(level.generator,
                                                                                              "fixed_masking"))


def test_memory_estimate_scales_and_grad_checkpointing_lowers_it():
    model = FractalGen(img_size_list=(16, 4, 1), embed_dim_list=(64, 32, 16), num_blocks_list=(4, 2, 1),
                       num_heads_list=(4, 2, 2), generator_type_list=("ar", "ar", "ar"), class_num=2)
    cpu = torch.device("cpu")
    one, eight = memory.training_memory(model, 1, cpu), memory.training_memory(model, 8, cpu)
    params = sum(p.numel() for p in model.parameters())
    assert one["state"] == eight["state"] == params * 16  # fp32 weights, gradients, AdamW's two moments
    assert eight["activations"] == 8 * one["activations"] > 0
    assert memory.training_memory(model, 1, cpu, ema=True)["state"] == params * 20  # + the fp32 EMA
    for fractal in model.levels():
        fractal.generator.grad_checkpointing = True
    assert memory.training_memory(model, 8, cpu)["activations"] < eight["activations"]
    assert memory.fitting_batch(eight, 8, eight["total"]) == 8
    assert memory.fitting_batch(eight, 8, 1) == 0


PEAK_SCRIPT = """
import sys, torch
sys.path.insert(0, {repo!r})
from models import create_model
from util import memory
from util.misc import keep_freed_memory
torch.set_num_threads(1)
keep_freed_memory()
model = create_model({name!r}, class_num=4)
estimate = memory.training_memory(model, {batch}, torch.device("cpu"))
optimizer = torch.optim.AdamW(model.parameters())
images, labels = torch.randn({batch}, 3, 16, 16), torch.randint(0, 4, ({batch},))
def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak
before = status("VmRSS:")
for _ in range(2):
    model(images, labels).backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
weights = 4 * sum(p.numel() for p in model.parameters())
print((estimate["total"] - weights) / (status("VmHWM:") - before))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak memory is read from Linux's /proc")
@pytest.mark.parametrize("name", ["fractalar_tiny", "fractalmar_tiny"])
def test_memory_estimate_is_close_to_the_real_peak(name):
    code = PEAK_SCRIPT.format(repo=REPO, name=name, batch=64)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    ratio = float(result.stdout.strip().splitlines()[-1])
    assert 0.75 < ratio < 1.4, f"estimate / measured peak = {ratio:.2f}"


# ---------------------------------------------------------------------- 6. flag typos
@pytest.mark.parametrize("parser, argv, suggestion", [
    (main_fractalgen.get_args_parser, ["--epcohs", "3"], "did you mean --epochs?"),
    (main_fractalgen.get_args_parser, ["--batch-size", "3"], "did you mean --batch_size?"),
    (sample.get_args_parser, ["--ckpt", "x", "--lables", "3"], "did you mean --labels?"),
    (quickstart.get_args_parser, ["--epoch", "3", "--sed", "1"], "did you mean --seed?"),
])
def test_flag_typos_are_one_line_with_did_you_mean(parser, argv, suggestion, capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and suggestion in err and "usage:" not in err


def test_misspelt_model_name_gets_did_you_mean(tmp_path):
    args = main_fractalgen.get_args_parser().parse_args(["--model", "fractalar_in6", "--data_path", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"^error: --model 'fractalar_in6' is neither .*; did you mean "
                                         r"fractalar_in64\?$"):
        main_fractalgen.main(args)


# ---------------------------------------------------------------------- 7. --ckpt errors
def test_ckpt_errors_say_what_is_wrong(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parent = str(trained.parent)
    with pytest.raises(SystemExit, match=rf"{re.escape(parent)} is a folder without checkpoint-last.pth; did you "
                                         rf"mean {re.escape(str(trained))}\?"):
        sample.main(["--ckpt", parent])
    png = tmp_path / "samples.png"
    Image.new("RGB", (4, 4)).save(png)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(png)])
    assert "it is a PNG image" in str(e.value) and "could run code" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(trained), "--model", "fractalmar_tiny"])
    assert "was saved by --model fractalar_tiny, not fractalmar_tiny" in str(e.value) and len(str(e.value)) < 250
    assert os.listdir(tmp_path) == ["samples.png"]


# ---------------------------------------------------------------------- 8. pip install, known images
def test_wheel_installs_the_packages_and_the_snippet_runs_from_anywhere(trained, tmp_path):
    """`pip install .` (-e too) finds the flat layout's packages; the README's snippet then
    runs from any folder."""
    source = tmp_path / "src"
    files = subprocess.run(["git", "-C", REPO, "ls-files", "-co", "--exclude-standard"], capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if os.path.isfile(os.path.join(REPO, name)):
            os.makedirs(source / os.path.dirname(name), exist_ok=True)
            with open(os.path.join(REPO, name), "rb") as f:
                (source / name).write_bytes(f.read())
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "wheel"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "wheel").iterdir())
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        assert {"models/__init__.py", "util/__init__.py", "main_fractalgen.py"} <= set(z.namelist())
        z.extractall(site)
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        snippet = re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)  # the README's, as written
    assert '"quickstart_out/train"' in snippet and "set_threads(" in snippet
    snippet = snippet.replace('"quickstart_out/train"', repr(str(trained))) + "print(tuple(images.shape))\n"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    ran = subprocess.run([sys.executable, "-c", snippet], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "(4, 3, 16, 16)"


def test_known_accepts_pil_images_and_hwc_arrays(trained, tmp_path):
    model = load_model(str(trained))
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    mask = make_mask("inpaint", 16)
    results = []
    for known in (load_image(str(path), 16), Image.open(path), np.asarray(Image.open(path))):
        torch.manual_seed(0)
        results.append(model.generate([0], known=known, known_mask=mask))
    assert all(torch.equal(results[0], r) for r in results[1:])
    with pytest.raises(ValueError, match=r"known must be images .*got \(16, 16, 4\).*load_image"):
        model.generate([0], known=Image.open(path).convert("RGBA"), known_mask=mask)


# ---------------------------------------------------------------------- 9. --help, --num_workers
@pytest.mark.parametrize("parser", [main_fractalgen.get_args_parser, sample.get_args_parser,
                                    quickstart.get_args_parser])
def test_help_shows_no_meaningless_defaults(parser):
    text = " ".join(parser().format_help().split())
    assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text


def test_num_workers_default_suits_the_machine(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "usable_cores", lambda: 2)
    assert cli.default_num_workers() == 2
    monkeypatch.setattr(cli, "usable_cores", lambda: 64)
    assert cli.default_num_workers() == 10
    monkeypatch.undo()
    args = main_fractalgen.get_args_parser().parse_args(
        ["--model", TINY, "--data_path", tiny_data, "--output_dir", str(tmp_path), "--evaluate_nll", "--resume",
         str(tmp_path), "--device", "cpu", "--nll_bsz", "5"])
    assert args.num_workers is None
    monkeypatch.setattr(cli, "usable_cores", lambda: 1)  # one worker process, fast to start
    torch.save({"model": create_model(TINY, class_num=2).state_dict(), "args": argparse.Namespace(model=TINY)},
               tmp_path / "checkpoint-last.pth")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main_fractalgen.main(args)
    assert args.num_workers == 1
    assert not [w for w in caught if "might freeze" in str(w.message) or "worker processes" in str(w.message)]


# ---------------------------------------------------------------------- 11. --fast
def test_fast_says_it_compiles_and_when_it_pays(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    seen = {}

    def generate(self, labels, fast=False, **kwargs):
        seen["fast"] = fast
        return torch.zeros(len(labels), 3, 16, 16, dtype=torch.uint8)

    monkeypatch.setattr(FractalGen, "generate", generate)
    sample.main(["--ckpt", str(trained), "--fast", "--output", "s.png"])
    err = capsys.readouterr().err
    assert seen["fast"] is True
    assert "compiling first, which takes a minute or two" in err and "drop --fast" in err
    assert err.index("compiling") < err.index("generated")
    assert "drop --fast" not in cli.fast_notice(True, torch.nn.Linear(2000, 1000))  # 2M parameters
    assert cli.fast_notice(False, torch.nn.Linear(2, 2)) is None


# ---------------------------------------------------------------------- 12. quick start hints
def test_quickstart_hints_say_mar_for_outpainting_and_why_edits_keep_remnants(tmp_path):
    def hints(model):
        args = quickstart.get_args_parser().parse_args(["--out", str(tmp_path / "q"), "--model", model])
        return "\n".join(quickstart.next_steps(args, str(tmp_path / "q"), str(tmp_path / "q" / "data"),
                                               str(tmp_path / "q" / "train")))
    ar = hints("fractalar_tiny")
    assert "outpainting works best with a MAR model" in ar and "--model fractalmar_tiny" in ar
    assert "outpainting works best" not in hints("fractalmar_tiny")
    assert "what lies outside the box stays" in ar
