"""Real multi-process runs: torchrun with 2 CPU processes over gloo."""
import os
import re
import subprocess
import sys

import pytest
import torch

from models import create_model
from util.checkpoint import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs main() like `python main_fractalgen.py`, then saves this rank's final weights (and EMA
# weights) so the test can compare ranks.
RANK_WRAPPER = """
import os, sys, torch
sys.path.insert(0, {repo!r})
from main_fractalgen import get_args_parser, main
result = main(get_args_parser().parse_args(sys.argv[1:]))
torch.save(result["model"].state_dict(), os.path.join({out!r}, "rank%s.pt" % os.environ["RANK"]))
torch.save(result.get("model_ema"), os.path.join({out!r}, "ema%s.pt" % os.environ["RANK"]))
"""


def torchrun(script_args, env, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script_args]
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_two_cpu_processes_train_identically_and_generate_unique_images(
        tiny_data, fid_stats, inception_weights, tmp_path, child_env):
    out = tmp_path / "run"
    out.mkdir()
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(RANK_WRAPPER.format(repo=REPO, out=str(out)))
    stdout = torchrun([wrapper, "--model", "fractalmar_tiny", "--data_path", tiny_data, "--output_dir", out,
                       "--device", "cpu", "--batch_size", 2, "--epochs", 1, "--warmup_epochs", 1, "--blr", 1e-2,
                       "--num_workers", 0, "--online_eval", "--num_images", 6, "--gen_bsz", 2, "--ema_rate", 0.9,
                       "--fid_stats_path", fid_stats, "--inception_weights", inception_weights], child_env)
    assert "distributed: 2 processes, backend gloo" in stdout
    assert "generated 6 images" in stdout and re.search(r"fid: \d+\.\d+", stdout)
    assert not [d for d in os.listdir(out) if d.startswith("tmp-")]

    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    ckpt = load_checkpoint(str(out / "checkpoint-last.pth"))
    assert ckpt["optimizer"]["state"][0]["step"] == 3  # 12 images / (2 per rank x 2 ranks)
    model = create_model("fractalmar_tiny", class_num=2)
    model.load_state_dict(ckpt["model"])  # strict
    init = create_model("fractalmar_tiny", class_num=2).state_dict()
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), f"ranks diverged at {key}"
        assert torch.equal(value, ckpt["model"][key]), key
    assert any(not torch.equal(v, init[k]) for k, v in rank0.items())
    ema0, ema1 = (torch.load(out / f"ema{r}.pt", weights_only=True) for r in (0, 1))
    assert list(ema0) == list(ckpt["model_ema"]) == list(ckpt["model"])  # the model's keys, no 'module.'
    for key, value in ema0.items():  # every rank keeps the same average, without communicating
        assert torch.equal(value, ema1[key]) and torch.equal(value, ckpt["model_ema"][key]), key
        assert not torch.equal(value, rank0[key]) or torch.equal(value, init[key]), key


def test_nll_over_two_processes_counts_each_val_image_once(tiny_data, tmp_path, child_env):
    """5 val images over 2 ranks: no padded duplicates, and the AR model's (deterministic)
    bits/dim equals a single plain-python process's."""
    torch.manual_seed(0)
    path = tmp_path / "weights.pth"
    torch.save({"model": create_model("fractalar_tiny", class_num=2).state_dict()}, path)
    argv = ["main_fractalgen.py", "--model", "fractalar_tiny", "--data_path", tiny_data, "--device", "cpu",
            "--output_dir", tmp_path / "eval", "--resume", path, "--evaluate_nll", "--nll_bsz", 2, "--num_workers", 0]
    pattern = r"NLL over (\d+) val images .*: ([\d.]+) bits/dim"
    two = re.search(pattern, torchrun(argv, child_env))
    single = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, env=child_env, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    one = re.search(pattern, single.stdout)
    assert two.group(1) == one.group(1) == "5"
    assert float(two.group(2)) == pytest.approx(float(one.group(2)), abs=2e-5)
