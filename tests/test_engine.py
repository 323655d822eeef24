"""main_fractalgen / engine_fractalgen on one CPU process: schedules, data, training with
online FID, NLL, generation, and one clear error for each kind of bad input."""
import argparse
import hashlib
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import engine_fractalgen as engine
from main_fractalgen import param_groups
from models import FractalGen, create_model
from util import lr_sched
from util.checkpoint import load_checkpoint
from util.crop import center_crop_arr
from util.data import ShardSampler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(data, out, *extra, model="fractalar_tiny"):
    """Training on the tiny ImageFolder: 12 images, batch 4 -> 3 steps per epoch."""
    return ["--model", model, "--data_path", data, "--output_dir", out, "--device", "cpu", "--batch_size", 4,
            "--epochs", 1, "--warmup_epochs", 1, "--num_workers", 0, *extra]


@pytest.fixture(scope="module")
def ar_run(tiny_data, tmp_path_factory):
    """Output folder of one epoch of fractalar_tiny training (checkpoint-last.pth inside)."""
    from main_fractalgen import get_args_parser, main
    out = str(tmp_path_factory.mktemp("ar_run"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    main(get_args_parser().parse_args([str(a) for a in tiny_args(tiny_data, out)]))
    torch.set_num_threads(threads)
    return out


# The official command lines (README of the official repository), minus the launcher.
OFFICIAL = {
    "train_fractalar_in64": "--model fractalar_in64 --img_size 64 --num_conds 1 --batch_size 64 --eval_freq 40 "
    "--save_last_freq 10 --epochs 800 --warmup_epochs 40 --blr 5.0e-5 --weight_decay 0.05 --attn_dropout 0.1 "
    "--proj_dropout 0.1 --lr_schedule cosine --gen_bsz 256 --num_images 8000 --num_iter_list 64,16 --cfg 11.0 "
    "--cfg_schedule linear --temperature 1.03 --output_dir OUT --resume OUT --data_path DATA "
    "--grad_checkpointing --online_eval",
    "train_fractalmar_large_in256": "--model fractalmar_large_in256 --img_size 256 --num_conds 5 --guiding_pixel "
    "--batch_size 32 --eval_freq 40 --save_last_freq 10 --epochs 800 --warmup_epochs 40 --blr 5.0e-5 "
    "--weight_decay 0.05 --attn_dropout 0.1 --proj_dropout 0.1 --lr_schedule cosine --gen_bsz 256 "
    "--num_images 8000 --num_iter_list 64,16,16 --cfg 21.0 --cfg_schedule linear --temperature 1.1 "
    "--output_dir OUT --resume OUT --data_path DATA --grad_checkpointing --online_eval",
    "nll_fractalmar_in64": "--model fractalmar_in64 --img_size 64 --num_conds 5 --nll_bsz 128 "
    "--nll_forward_number 10 --output_dir pretrained_models/fractalmar_in64 --resume "
    "pretrained_models/fractalmar_in64 --data_path DATA --seed 0 --evaluate_nll",
    "gen_fractalmar_huge_in256": "--model fractalmar_huge_in256 --img_size 256 --num_conds 5 --guiding_pixel "
    "--gen_bsz 1024 --num_images 50000 --num_iter_list 64,16,16 --cfg 19.0 --cfg_schedule linear "
    "--temperature 1.1 --output_dir pretrained_models/fractalmar_huge_in256 --resume "
    "pretrained_models/fractalmar_huge_in256 --data_path DATA --seed 0 --evaluate_gen",
}


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_command_lines_parse_and_build_the_official_architecture(name):
    from main_fractalgen import build_model, check_args, check_img_size, get_args_parser
    args = get_args_parser().parse_args(OFFICIAL[name].split())
    check_args(args)
    check_img_size(args)  # 64 / 256 match the models
    args.class_num = 1000
    with torch.device("meta"):
        model = build_model(args)
    assert len(args.num_iter_list or model.default_num_iter_list()) == model.num_fractal_levels - 1
    prefix = model.generator.pos_embed_learned.shape[1] - model.generator.seq_len
    assert prefix == args.num_conds  # condition tokens in front of the patches (no guiding pixel at level 0)
    assert model.class_emb.weight.shape[0] == 1000


# ---------------------------------------------------------------- small pieces
def test_lr_schedule_warmup_then_cosine_or_constant():
    args = argparse.Namespace(lr=1.0, min_lr=0.1, warmup_epochs=2, epochs=10, lr_schedule="cosine")
    assert lr_sched.learning_rate(0, args) == 0
    assert lr_sched.learning_rate(1, args) == pytest.approx(0.5)
    assert lr_sched.learning_rate(2, args) == pytest.approx(1.0)
    assert lr_sched.learning_rate(6, args) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_sched.learning_rate(10, args) == pytest.approx(0.1)
    args.lr_schedule = "constant"
    assert lr_sched.learning_rate(7.3, args) == 1.0
    optimizer = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)]},
                                 {"params": [torch.zeros(1, requires_grad=True)], "lr_scale": 0.5}], lr=3)
    lr_sched.adjust_learning_rate(optimizer, 1.0, args)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.25]


def test_adm_center_crop_halves_resizes_and_crops():
    # 70 x 40 (W x H), target 16: BOX-halve once (35 x 20), BICUBIC short side 20 -> 16, centre crop
    columns = torch.arange(70, dtype=torch.uint8).mul(3).view(1, 70, 1).expand(40, 70, 3).contiguous()
    out = center_crop_arr(Image.fromarray(columns.numpy()), 16)
    assert out.size == (16, 16)
    row = torch.from_numpy(np.array(out))[0, :, 0]
    assert (row[1:] >= row[:-1]).all()               # the gradient survives, left to right
    assert abs(row.float().mean().item() - 3 * 34.5) < 6  # and the crop is the centre of it
    assert center_crop_arr(Image.new("RGB", (16, 16)), 16).size == (16, 16)


def test_weight_decay_skips_biases_and_1d_parameters():
    model = create_model("fractalmar_tiny", class_num=2)
    no_decay, decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.05
    assert all(n.endswith(".bias") or model.get_parameter(n).ndim == 1 for n in skipped)
    assert {"class_emb.weight", "fake_latent", "generator.blocks.0.attn.qkv.weight"} <= decayed
    assert len(skipped) + len(decayed) == len(list(model.parameters()))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_generation_ids_are_unique_and_cover_all_images(world_size):
    num_images, batch = 10, 3
    ids = [i for rank in range(world_size) for batch_ids in engine.rank_batches(num_images, batch, rank, world_size)
           for i in batch_ids]
    assert sorted(ids) == list(range(num_images))
    labels = engine.generation_labels(12, 4)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_shard_sampler_counts_every_image_once():
    shards = [list(ShardSampler(5, rank, 2)) for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- end to end
def test_train_with_online_eval_then_nll_and_generation(run_main, tiny_data, fid_stats, inception_weights,
                                                         tmp_path):
    out = str(tmp_path / "out")
    fid_flags = ["--fid_stats_path", fid_stats, "--inception_weights", inception_weights]
    result = run_main(*tiny_args(tiny_data, out, "--online_eval", "--num_images", 4, "--gen_bsz", 2,
                                 "--grad_checkpointing", *fid_flags))
    stats = result["train"]
    assert math.isfinite(stats["loss"]) and math.isfinite(stats["fid"]) and stats["inception_score"] > 1 - 1e-9
    assert not [d for d in os.listdir(out) if d.startswith("tmp-")], "online eval must delete its images"
    ckpt = load_checkpoint(os.path.join(out, "checkpoint-last.pth"))
    assert set(ckpt) == {"model", "optimizer", "epoch", "scaler", "args", "train_state", "config"}  # official + ours
    assert ckpt["train_state"]["epoch"] == 1 and ckpt["train_state"]["step"] == 0
    assert ckpt["epoch"] == 0 and isinstance(ckpt["args"], argparse.Namespace)
    assert ckpt["optimizer"]["state"][0]["step"] == 3

    nll = run_main("--model", "fractalar_tiny", "--data_path", tiny_data, "--output_dir", out, "--resume", out,
                   "--device", "cpu", "--num_workers", 0, "--evaluate_nll", "--nll_bsz", 2,
                   "--nll_forward_number", 2)["nll"]
    assert nll["images"] == 5 and nll["bpd"] == pytest.approx(nll["nll"] / math.log(2))
    assert 6 < nll["bpd"] < 10  # near-untrained: about log2(256) = 8 bits per sub-pixel

    gen = run_main("--model", "fractalar_tiny", "--output_dir", out, "--resume", out, "--device", "cpu",
                   "--num_workers", 0, "--evaluate_gen", "--num_images", 4, "--gen_bsz", 2, "--cfg", 2.0,
                   "--prc_ref_dir", os.path.join(tiny_data, "val"), *fid_flags)["gen"]
    pngs = sorted(os.listdir(gen["folder"]))
    assert pngs == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert Image.open(os.path.join(gen["folder"], pngs[0])).size == (16, 16)
    assert gen["sec_per_image"] > 0 and math.isfinite(gen["fid"])
    assert 0 <= gen["precision"] <= 1 and 0 <= gen["recall"] <= 1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = set()
    for name in os.listdir(out):
        if name.startswith("events.out.tfevents"):
            tags |= set(EventAccumulator(os.path.join(out, name)).Reload().Tags()["scalars"])
    assert {"train_loss", "lr", "val_bpd", "fid_cfg1.0", "is_cfg1.0", "fid_cfg2.0"} <= tags


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(run_main, tiny_data, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    forward, calls = FractalGen.forward, []

    def nan_from_second_epoch(self, imgs, labels):
        loss = forward(self, imgs, labels)
        if self.fractal_level > 0:  # nested levels call forward too
            return loss
        calls.append(1)
        return loss * float("nan") if len(calls) > 3 else loss  # epoch 0 has 3 steps

    monkeypatch.setattr(FractalGen, "forward", nan_from_second_epoch)
    with pytest.raises(SystemExit, match=r"training loss is nan at epoch 1, step 0.*last checkpoint is kept"):
        run_main(*tiny_args(tiny_data, out, "--epochs", 3, "--save_last_freq", 1, "--no_memory_check"))
    ckpt = load_checkpoint(os.path.join(out, "checkpoint-last.pth"))
    assert ckpt["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


# ---------------------------------------------------------------- bad input
def _digest(folder):
    path = os.path.join(folder, "checkpoint-last.pth")
    return hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.exists(path) else None


def _make_bad_data(kind, root):
    """Broken dataset variants under root; returns the --data_path."""
    from conftest import write_imagefolder
    if kind == "empty":
        os.makedirs(root)
    elif kind == "no_val":
        write_imagefolder(os.path.join(root, "train"), (2, 2), seed=0)
    elif kind == "no_class_folders":  # nor images: loose images would be one class (tests/test_unlabelled.py)
        os.makedirs(os.path.join(root, "train"))
        with open(os.path.join(root, "train", "notes.txt"), "w") as f:
            f.write("not an image")
    elif kind == "empty_class":
        write_imagefolder(os.path.join(root, "train"), (2, 2), seed=0)
        os.makedirs(os.path.join(root, "train", "class9"))
    elif kind == "unreadable":
        write_imagefolder(os.path.join(root, "train"), (4, 4), seed=0)
        with open(os.path.join(root, "train", "class1", "broken.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n not really a png")
    return root


BAD_DATA = {
    "missing": ([], r"--data_path '.*nowhere' is not a folder"),
    "empty": ([], r"train does not exist; --data_path needs a train/ folder"),
    "no_val": (["--evaluate_nll"], r"val does not exist"),
    "no_class_folders": ([], r"train holds no class folders and no images"),
    "empty_class": ([], r"Found no valid file for the classes class9"),
    "unreadable": (["--num_workers", 1, "--batch_size", 9], r"cannot read image .*class1/broken\.png"),
}


@pytest.mark.parametrize("kind", BAD_DATA)
def test_bad_data_is_one_clear_sentence(kind, run_main, ar_run, tmp_path):
    data = _make_bad_data(kind, str(tmp_path / "nowhere"))
    extra, message = BAD_DATA[kind]
    if "--evaluate_nll" in extra:
        extra = [*extra, "--resume", ar_run]
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as err:
        run_main(*tiny_args(data, out, *extra))
    text = str(err.value.code)
    assert text.startswith("error: ") and "\n" not in text
    assert re.search(message, text), text
    assert not os.path.exists(os.path.join(out, "checkpoint-last.pth"))
    if kind != "unreadable":  # found while training; everything else before anything is written
        assert not os.path.exists(out)


BAD_FLAGS = {
    "num_images_not_divisible": (["--online_eval", "--num_images", 5], r"--num_images 5 is not divisible by class_num 2"),
    "img_size": (["--img_size", 32], r"--img_size 32 does not match --model fractalar_tiny, which models 16x16"),
    "class_num": (["--class_num", 3], r"has 2 class folders but --class_num says 3"),
    "fid_stats": (["--online_eval", "--num_images", 4, "--fid_stats_path", "missing.npz"],
                  r"missing\.npz not found; pass --fid_stats_path .*python -m util\.fid_stats"),
    "fp16_cpu": (["--precision", "fp16"], r"--precision fp16 needs a CUDA device"),
    "num_iter_list": (["--online_eval", "--num_images", 4, "--num_iter_list", "4,4,4"],
                      r"has 3 entries but --model fractalar_tiny has 2 generator levels"),
    "world_size": (["--world_size", 2], r"--world_size 2 but 1 process"),
    "num_conds": (["--num_conds", 9], r"cannot build --model fractalar_tiny: num_conds must be between 1 and 5"),
    "batch_size": (["--batch_size", 0], r"--batch_size must be at least 1"),
    "too_few_images": (["--batch_size", 64], r"has 12 images, fewer than one step of --batch_size 64"),
}


@pytest.mark.parametrize("kind", BAD_FLAGS)
def test_bad_flags_are_one_clear_sentence(kind, run_main, tiny_data, tmp_path):
    extra, message = BAD_FLAGS[kind]
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit, match=message) as err:
        run_main(*tiny_args(tiny_data, out, *extra))
    assert "\n" not in str(err.value.code)
    assert not os.path.exists(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(run_main, tiny_data, tmp_path):
    with pytest.raises(SystemExit, match=r"--device cuda was requested but CUDA is not available; pass --device cpu"):
        run_main(*tiny_args(tiny_data, str(tmp_path / "out"), "--device", "cuda"))


def _corrupt(folder):
    os.makedirs(folder)
    with open(os.path.join(folder, "checkpoint-last.pth"), "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    return folder


BAD_CHECKPOINTS = {
    # (how to get the --resume folder, extra flags, message)
    "no_checkpoint": (lambda ar, tmp: os.makedirs(tmp / "empty") or str(tmp / "empty"), [],
                      r"--resume .*empty: no checkpoint-last\.pth there"),
    "eval_without_resume": (lambda ar, tmp: "", ["--evaluate_nll"], r"evaluation needs weights: pass --resume"),
    "other_model": (lambda ar, tmp: ar, ["--model", "fractalmar_tiny", "--evaluate_nll"],
                    r"does not fit --model fractalmar_tiny: it was saved by --model fractalar_tiny$"),
    "corrupt": (lambda ar, tmp: _corrupt(str(tmp / "corrupt")), [], r"cannot read checkpoint .*corrupt"),
}


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_bad_checkpoints_are_one_clear_sentence(kind, run_main, tiny_data, ar_run, tmp_path):
    resume_of, extra, message = BAD_CHECKPOINTS[kind]
    resume = resume_of(ar_run, tmp_path)
    before = _digest(ar_run)
    argv = tiny_args(tiny_data, ar_run, *extra)  # output_dir = the trained run: nothing there may change
    argv += ["--resume", resume] if resume else []
    with pytest.raises(SystemExit, match=message) as err:
        run_main(*argv)
    assert "\n" not in str(err.value.code)
    assert _digest(ar_run) == before


def test_plain_python_entry_point_exits_non_zero_with_one_line(tmp_path, child_env):
    proc = subprocess.run([sys.executable, "main_fractalgen.py", "--model", "fractalar_tiny", "--device", "cpu",
                           "--data_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")],
                          cwd=REPO, env=child_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: --data_path") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, applied", [(["--device", "cpu"], True),
                                            (["--device", "cpu", "--cpu_malloc", "default"], False),
                                            (["--device", "cuda"], False)])
def test_script_entry_sets_the_cpu_allocator_policy_only_on_cpu(monkeypatch, flags, applied):
    """The allocator policy is process-wide: the command-line entry sets it (CPU runs only,
    unless --cpu_malloc default); main() called in-process never does."""
    import main_fractalgen
    import util.misc
    calls = []
    monkeypatch.setattr(util.misc, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(main_fractalgen, "main", lambda args: args)
    args = main_fractalgen.script_main(["--model", "fractalar_tiny", *flags])
    assert bool(calls) == applied and args.model == "fractalar_tiny"


@pytest.mark.slow
def test_compile_flag_trains_and_evaluates_with_compiled_blocks(run_main, tiny_data, tmp_path):
    """--compile compiles every transformer block; training and NLL run through them and
    give the eager numbers up to rounding (the weights after one epoch differ only slightly)."""
    eager_out, compiled_out = str(tmp_path / "eager"), str(tmp_path / "compiled")
    eager = run_main(*tiny_args(tiny_data, eager_out, model="fractalmar_tiny"))
    compiled = run_main(*tiny_args(tiny_data, compiled_out, "--compile", model="fractalmar_tiny"))
    blocks = [m for m in compiled["model"].modules() if type(m).__name__ in ("Block", "ARBlock")]
    assert blocks and all(getattr(m, "_compiled_call_impl", None) is not None for m in blocks)
    assert compiled["train"]["loss"] == pytest.approx(eager["train"]["loss"], rel=1e-3)
    nll = run_main("--model", "fractalmar_tiny", "--data_path", tiny_data, "--output_dir", compiled_out,
                   "--resume", compiled_out, "--device", "cpu", "--num_workers", 0, "--evaluate_nll",
                   "--nll_bsz", 5, "--compile")["nll"]
    assert nll["images"] == 5 and 6 < nll["bpd"] < 10


@pytest.mark.parametrize("flag, fast", [("off", False), ("compiled", True), ("frozen", "frozen"), (True, True)])
def test_generation_passes_fast_sampling_to_generate(flag, fast):
    import engine_fractalgen

    class Recorder(torch.nn.Module):
        img_size, in_channels = 4, 3

        def __init__(self):
            super().__init__()
            self.seen = []

        def generate(self, labels, **kwargs):
            self.seen.append(kwargs["fast"])
            return torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8)

    class Bank:  # stands in for util.fid.FeatureBank
        def add(self, images, ids):
            pass

    import tempfile
    args = argparse.Namespace(device="cpu", seed=0, num_images=2, class_num=2, gen_bsz=2, precision="fp32",
                              num_iter_list=None, cfg=1.0, cfg_schedule="linear", temperature=1.0,
                              filter_threshold=1e-4, fast_sampling=flag)
    model = Recorder()
    with tempfile.TemporaryDirectory() as folder:
        engine_fractalgen.generate_images(model, args, 0, folder, Bank())
    assert model.seen == [fast]


@pytest.mark.parametrize("argv, value", [([], "off"), (["--fast_sampling"], "compiled"),
                                         (["--fast_sampling", "frozen"], "frozen")])
def test_fast_sampling_flag_values(argv, value):
    from main_fractalgen import get_args_parser
    assert get_args_parser().parse_args(argv).fast_sampling == value


def test_fast_sampling_flag_rejects_other_values(capsys):
    from main_fractalgen import get_args_parser
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--fast_sampling", "turbo"])
    assert "invalid choice: 'turbo'" in capsys.readouterr().err
