"""demo/sample.py (sampling CLI with conditional tasks) and demo/quickstart.py (smoke run)."""
import argparse
import json
import os

import pytest
import torch
from PIL import Image

from demo import quickstart, sample
from models import create_model, load_model
from models.loading import resolve_checkpoint
from util import toy_data
from util.misc import UserInputError

TINY = "fractalar_tiny"  # the fastest tiny model on a CPU


def write_checkpoint(path, name=TINY, class_num=4, with_args=True):
    torch.manual_seed(0)
    model = create_model(name, class_num=class_num)
    state = {"model": model.state_dict()}
    if with_args:
        state["args"] = argparse.Namespace(model=name, class_num=class_num, num_conds=None, guiding_pixel=None)
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint-last.pth")


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A 24x20 image (not square, not 16x16: exercises resize + centre crop)."""
    path = tmp_path_factory.mktemp("img") / "in.png"
    Image.new("RGB", (24, 20), (200, 30, 30)).save(path)
    return str(path)


def pixels(path):
    with Image.open(path) as im:
        im.load()
        return im.size, getattr(im, "n_frames", 1), im.convert("RGB").tobytes()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per test


def test_sample_cli_grid_gif_and_seed(ckpt, tmp_path):
    out, gif = tmp_path / "s.png", tmp_path / "s.gif"
    sample.main(["--ckpt", ckpt, "--labels", "0,1", "2", "--num_per_label", "2", "--output", str(out),
                 "--gif", str(gif), "--scale", "1", "--seed", "3"])
    size, frames, first = pixels(out)
    assert size == (2 * 16 + 3 * 2, 3 * 16 + 4 * 2)  # 3 rows (labels) x 2 columns, 2-pixel gaps
    gif_size, gif_frames, _ = pixels(gif)
    assert gif_size == size and gif_frames > 2  # AR tiny: one frame per top-level patch, then the result
    sample.main(["--ckpt", ckpt, "--labels", "0,1", "2", "--num_per_label", "2", "--output", str(out),
                 "--scale", "1", "--seed", "3"])
    assert pixels(out)[2] == first  # same seed, same images
    sample.main(["--ckpt", ckpt, "--labels", "0,1", "2", "--num_per_label", "2", "--output", str(out),
                 "--scale", "1", "--seed", "4"])
    assert pixels(out)[2] != first


@pytest.mark.parametrize("task", ["inpaint", "outpaint", "uncrop", "edit"])
def test_sample_cli_conditional_tasks_keep_the_known_pixels(ckpt, picture, tmp_path, task):
    out = tmp_path / f"{task}.png"
    sample.main(["--ckpt", ckpt, "--task", task, "--input", picture, "--labels", "1", "--num_per_label", "2",
                 "--output", str(out), "--scale", "1", "--num_iter_list", "16,16", "--temperature", "1.0"])
    (w, h), _, raw = pixels(out)
    assert (w, h) == (3 * 16 + 4 * 2, 16 + 2 * 2)  # masked input + 2 completions
    grid = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(h, w, 3).permute(2, 0, 1)
    from util.masks import make_mask
    known = make_mask(task, 16)[0, 0]
    for col in (1, 2):  # both completions keep the known part of the input exactly
        tile = grid[:, 2:18, 2 + col * 18:18 + col * 18]
        assert (tile[:, known] == torch.tensor([200, 30, 30]).view(3, 1)).all()
        assert not (tile[:, ~known] == torch.tensor([200, 30, 30]).view(3, 1)).all()


def test_model_is_found_from_args_or_folder(tmp_path):
    bare = write_checkpoint(tmp_path / "bare.pth", with_args=False)
    with pytest.raises(UserInputError, match="--model"):
        load_model(bare)
    model = load_model(bare, TINY)
    assert model.model_name == TINY and model.class_num == 4  # class_num read from the class embedding
    folder = tmp_path / "fractalar_tiny"
    folder.mkdir()
    write_checkpoint(folder / "checkpoint-last.pth", with_args=False)
    assert load_model(str(folder)).model_name == TINY  # pretrained_models/<name>/ layout


def test_sample_cli_errors_are_one_sentence(ckpt, picture, tmp_path):
    out = str(tmp_path / "x.png")
    with pytest.raises(SystemExit, match="needs --input"):
        sample.main(["--ckpt", ckpt, "--task", "inpaint", "--output", out])
    with pytest.raises(SystemExit, match=r"outside \[0, 4\)"):
        sample.main(["--ckpt", ckpt, "--labels", "7", "--output", out])
    with pytest.raises(SystemExit, match="was saved by --model fractalar_tiny, not fractalmar_tiny"):
        sample.main(["--ckpt", ckpt, "--model", "fractalmar_tiny", "--output", out])
    with pytest.raises(SystemExit, match="not found"):
        sample.main(["--ckpt", str(tmp_path / "nope.pth"), "--output", out])
    with pytest.raises(UserInputError, match="util/download.py --model fractalmar_in64"):
        resolve_checkpoint("fractalmar_in64", root=str(tmp_path))
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SystemExit, match="broken.pth"):
        sample.main(["--ckpt", str(broken), "--output", out])
    with pytest.raises(SystemExit, match="missing.png' does not exist"):
        sample.main(["--ckpt", ckpt, "--task", "edit", "--input", str(tmp_path / "missing.png"), "--output", out])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(SystemExit, match="cannot read input image .*notes.png"):
        sample.main(["--ckpt", ckpt, "--task", "edit", "--input", str(not_an_image), "--output", out])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="fp16 needs a CUDA device"):
            sample.main(["--ckpt", ckpt, "--precision", "fp16", "--device", "cpu", "--output", out])


def test_sampling_config_follows_the_model_defaults():
    from models import DEFAULT_SAMPLING
    with torch.device("meta"):
        model = create_model("fractalmar_in64")
    model.sampling_defaults = dict(DEFAULT_SAMPLING["fractalmar_in64"])
    s = model.sampling_config(cfg=2.0, temperature=None)
    assert s == {**DEFAULT_SAMPLING["fractalmar_in64"], "cfg": 2.0}
    model.sampling_defaults = None  # a bare model: the official API's defaults
    assert model.sampling_config() == dict(num_iter_list=(64, 16), cfg=1.0, cfg_schedule="linear",
                                           temperature=1.0, filter_threshold=1e-4)


def test_quickstart_smoke(tmp_path, capsys):
    """The quickstart end to end through main_fractalgen (1 short epoch): every output is
    written and is a valid image, the summary holds a finite bits/dim."""
    out = tmp_path / "qs"
    summary = quickstart.main(["--out", str(out), "--epochs", "1", "--num_classes", "2",
                               "--num_train_per_class", "8", "--num_val_per_class", "2", "--batch_size", "8",
                               "--samples_per_class", "2", "--device", "cpu"])
    assert 0 < summary["val_bpd"] < 10
    for name, frames in (("samples.png", 1), ("conditional.png", 1), ("generation.gif", 2)):
        size, n, _ = pixels(out / name)
        assert min(size) > 16 and n >= frames
    assert (out / "train" / "checkpoint-last.pth").is_file()
    assert (out / ".gitignore").read_text().splitlines()[-1] == "*"  # a new OUT stays out of git status
    assert json.loads((out / "summary.json").read_text())["classes"] == toy_data.class_names(2)
    printed = capsys.readouterr().out
    assert "bits/dim" in printed and str(out / "samples.png") in printed
    # a second run reuses data and checkpoint: nothing is retrained
    quickstart.main(["--out", str(out), "--epochs", "1", "--num_classes", "2", "--num_train_per_class", "8",
                     "--num_val_per_class", "2", "--batch_size", "8", "--samples_per_class", "2", "--device", "cpu"])
    assert "nothing to train" in capsys.readouterr().out
    # the settings it sampled with are stored in the checkpoint, for sample.py and the notebook
    from models import DEFAULT_SAMPLING
    from util.checkpoint import load_checkpoint
    assert load_checkpoint(str(out / "train" / "checkpoint-last.pth"))["sampling"] == DEFAULT_SAMPLING[TINY]
    # --fresh retrains, deleting only what the training wrote
    (out / "train" / "notes.txt").write_text("mine")
    quickstart.main(["--out", str(out), "--epochs", "1", "--num_classes", "2", "--num_train_per_class", "8",
                     "--num_val_per_class", "2", "--batch_size", "8", "--samples_per_class", "2", "--device", "cpu",
                     "--cfg", "1.5", "--fresh"])
    printed = capsys.readouterr().out
    assert "training epochs 0..0" in printed and (out / "train" / "notes.txt").read_text() == "mine"
    assert load_checkpoint(str(out / "train" / "checkpoint-last.pth"))["sampling"]["cfg"] == 1.5
    rerun = next(line for line in printed.splitlines() if "quickstart.py" in line and "--fresh" in line)
    assert f"--out {out} " in rerun and " --cfg 1.5 " in rerun and rerun.endswith(" --epochs 2 --fresh")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_quickstart_default_run_learns_the_classes(tmp_path):
    """The README's quickstart with its defaults (3.5-5.5 minutes on 2 cores): low val
    bits/dim, and the samples of each row carry their class's colour."""
    out = tmp_path / "qs"
    summary = quickstart.main(["--out", str(out), "--device", "cpu"])
    assert summary["val_bpd"] < 0.1
    model = load_model(str(out / "train"))
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(8)
    images = model.generate(labels)  # the settings the quick start stored in the checkpoint
    colours = torch.tensor([c for _, c, _ in toy_data.CLASSES[:4]], dtype=torch.float)  # (4, 3)
    hits = 0
    for image, label in zip(images, labels):
        pixels = image.flatten(1).t().float()  # (256, 3)
        shape = pixels[pixels.sum(1) > 250]   # backgrounds are dark
        if len(shape):
            votes = torch.cdist(shape, colours).argmin(1).bincount(minlength=4)
            hits += int(votes.argmax() == label)
    assert hits >= 0.9 * len(labels)


@pytest.mark.parametrize("flags, fast", [([], False), (["--fast"], True), (["--fast", "compiled"], True),
                                         (["--fast", "frozen"], "frozen")])
def test_sample_cli_passes_fast_to_generate(ckpt, tmp_path, monkeypatch, flags, fast):
    from models.fractalgen import FractalGen
    seen = []
    real_generate = FractalGen.generate

    def recording_generate(self, *args, **kwargs):
        seen.append(kwargs.get("fast"))
        kwargs["fast"] = False  # record the request, sample on the exact path (no compile in the suite)
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(FractalGen, "generate", recording_generate)
    sample.main(["--ckpt", ckpt, "--labels", "0", "--num_per_label", "1", "--output", str(tmp_path / "s.png"),
                 "--num_iter_list", "2,2", *flags])
    assert seen == [fast]
