"""Unlabelled folders: a --data_path whose train/ (and val/) hold the images directly trains
one class, an unconditional model, end to end: train, resume, NLL, generation with FID,
reload and sample; util.check_data says the same; a folder that mixes loose images and
class folders is refused with one line."""
import math
import os

import pytest
import torch
from PIL import Image

from demo import sample
from models import load_model
from util import check_data, toy_data
from util.checkpoint import load_checkpoint

UNCONDITIONAL = "holds 48 images without class folders: one class, no labels (an unconditional model"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The toy shapes of 4 classes, 12 + 2 images each, without class folders."""
    return toy_data.make_dataset(str(tmp_path_factory.mktemp("unlabelled")), num_classes=4, num_train_per_class=12,
                                 num_val_per_class=2, unlabelled=True)


def train_argv(data, out, *extra, epochs):
    """fractalar_tiny, batch 8 (6 steps an epoch), a constant lr that learns the shapes fast."""
    return ["--model", "fractalar_tiny", "--data_path", data, "--output_dir", out, "--resume", out, "--device", "cpu",
            "--batch_size", 8, "--epochs", epochs, "--warmup_epochs", 1, "--lr", 1e-2, "--lr_schedule", "constant",
            "--save_last_freq", 1, "--num_workers", 0, *extra]


def test_unlabelled_folder_trains_resumes_evaluates_samples_and_reloads(run_main, shapes, fid_stats, inception_weights,
                                                                        tmp_path, capsys):
    out = str(tmp_path / "run")
    assert sorted(os.listdir(os.path.join(shapes, "train")))[:2] == ["0_00000.png", "0_00001.png"]  # no folders
    run_main(*train_argv(shapes, out, epochs=4))
    text = capsys.readouterr().out
    assert f"{os.path.join(shapes, 'train')} {UNCONDITIONAL}; sampling without guidance, cfg 1)" in text
    assert "16x16, 1 class (unconditional)" in text
    ckpt = load_checkpoint(os.path.join(out, "checkpoint-last.pth"))
    assert ckpt["args"].class_num == 1 and ckpt["model"]["class_emb.weight"].shape[0] == 1
    assert ckpt["sampling"] == {"cfg": 1.0}  # stored sampling settings: no guidance

    run_main(*train_argv(shapes, out, epochs=8))
    assert "continuing at epoch 4" in capsys.readouterr().out

    nll = run_main("--model", "fractalar_tiny", "--data_path", shapes, "--output_dir", out, "--resume", out,
                   "--device", "cpu", "--num_workers", 0, "--evaluate_nll", "--nll_bsz", 8)["nll"]
    assert f"{os.path.join(shapes, 'val')} holds 8 images without class folders" in capsys.readouterr().out
    print(f"unlabelled toy shapes, fractalar_tiny, 48 steps: {nll['bpd']:.4f} bits/dim on the 8 val images")
    assert nll["images"] == 8 and nll["bpd"] < 2  # 8 bits/dim untrained: the shapes were learnt

    fid_flags = ["--fid_stats_path", fid_stats, "--inception_weights", inception_weights]
    gen = run_main("--model", "fractalar_tiny", "--output_dir", out, "--resume", out, "--device", "cpu",
                   "--num_workers", 0, "--evaluate_gen", "--num_images", 4, "--gen_bsz", 2, *fid_flags)
    assert gen["args"].class_num == 1 and gen["model"].sampling_config()["cfg"] == 1.0  # stored: no guidance
    assert gen["model"].sampling_origins()["cfg"] == {"by": "one class"}
    assert sorted(os.listdir(gen["gen"]["folder"])) == [f"0000{i}.png" for i in range(4)]
    assert "-cfg1.0linear-" in gen["gen"]["folder"] and math.isfinite(gen["gen"]["fid"])

    model = load_model(out)
    assert model.class_num == 1 and model.sampling_config()["cfg"] == 1.0
    torch.manual_seed(0)
    assert model.generate([0, 0]).shape == (2, 3, 16, 16)
    grid = tmp_path / "grid.png"
    sample.main(["--ckpt", out, "--output", str(grid), "--scale", "1"])  # --labels default: 0
    assert Image.open(grid).size == (16 + 2 * 2, 16 + 2 * 2)  # one image, 2-pixel margins


def test_check_data_describes_the_splits_as_training_does(shapes, tiny_data, capsys):
    assert check_data.main([shapes, "--workers", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{os.path.join(shapes, 'train')} {UNCONDITIONAL}; sampling without guidance, cfg 1)"
    assert lines[1].startswith(f"{os.path.join(shapes, 'val')} holds 8 images without class folders")
    assert check_data.main([os.path.join(tiny_data, "train"), "--workers", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{os.path.join(tiny_data, 'train')} holds 2 class folders"


def mixed_folder(root):
    """train/ with one loose image beside a class folder of images."""
    os.makedirs(os.path.join(root, "train", "cats"))
    for name in ("loose.png", os.path.join("cats", "a.png"), os.path.join("cats", "b.png")):
        Image.new("RGB", (16, 16)).save(os.path.join(root, "train", name))
    return root


def test_a_mix_of_loose_images_and_class_folders_is_refused_with_one_line(run_main, tmp_path, capsys):
    data = mixed_folder(str(tmp_path / "mixed"))
    message = (f"{os.path.join(data, 'train')} mixes 1 loose image(s) (e.g. loose.png) with 1 class folder(s) "
               f"(e.g. cats/); put every image in a class folder, or move the class folders' images up into "
               f"{os.path.join(data, 'train')} to train one class without labels")
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as err:
        run_main(*train_argv(data, out, epochs=1))
    assert err.value.code == f"error: {message}"
    assert not os.path.exists(out)
    assert check_data.main([data, "--workers", "1"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_hidden_folders_and_other_files_beside_loose_images_are_ignored(tmp_path):
    from util import data as data_util
    root = tmp_path / "d"
    os.makedirs(root / "train" / ".ipynb_checkpoints")
    (root / "train" / "README.txt").write_text("notes")
    for i in range(3):
        Image.new("RGB", (16, 16), (i, 0, 0)).save(root / "train" / f"{i}.PNG")
    dataset = data_util.build_dataset(str(root), "train", 16, True)
    assert dataset.unlabelled and dataset.classes == [data_util.UNLABELLED_CLASS] and len(dataset) == 3
    assert [label for _, label in (dataset[(0, i)] for i in range(3))] == [0, 0, 0]
