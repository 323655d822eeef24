"""The pipeline's numbers, pinned: each test fails for a plausible wrong variant of the
code (named in its docstring) that every other test lets through."""
import collections
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import engine_fractalgen as engine
from models import MAR
from util import fid
from util.checkpoint import load_checkpoint
from util.crop import center_crop_arr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")


class FirstPixelLoss(torch.nn.Module):
    """Stands in for a FractalGen: the loss of a batch is the mean of its images' first pixel."""

    def forward(self, imgs, labels):
        return imgs[:, 0, 0, 0].mean()


def test_nll_is_the_mean_over_images_not_over_batches_or_count_plus_one():
    """Wrong variants: dividing the summed loss by count + 1; averaging batch means (the last
    batch is short)."""
    values = torch.tensor([1.0, 2.0, 4.0, 8.0, 32.0])  # batches of 2, 2, 1
    data = torch.utils.data.TensorDataset(values.view(5, 1, 1, 1), torch.zeros(5, dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    args = types.SimpleNamespace(device="cpu", precision="fp32", seed=0, nll_forward_number=3)
    result = engine.evaluate_nll(FirstPixelLoss(), loader, args)
    assert result["images"] == 5
    assert result["nll"] == pytest.approx(sum(values.tolist()) / 5, rel=1e-12)  # 9.4; batch means give 13.5
    assert result["bpd"] == pytest.approx(result["nll"] / np.log(2), rel=1e-12)


def test_mar_eval_mask_count_is_uniform_over_1_to_L():
    """Wrong variant: the eval mask count drawn from 1..L-1 (the official draw is
    np.random.randint(L) + 1, so all L patches are masked in 1 of L passes)."""
    mar = MAR(seq_len=4, patch_size=1, cond_embed_dim=4, embed_dim=4, num_blocks=1, num_heads=1).eval()
    torch.manual_seed(0)
    counts = collections.Counter(int(mar.choose_mask(3, torch.device("cpu"))[0].sum()) for _ in range(800))
    assert sorted(counts) == [1, 2, 3, 4]
    assert all(140 < n < 260 for n in counts.values()), counts  # 200 expected each; 5 sigma is +-61


def test_adm_centre_crop_matches_the_official_crops():
    """Wrong variant: resizing with BILINEAR (or any filter but BOX halving + BICUBIC). The
    fixture holds crops made by the official center_crop_arr (see tests/fixtures/README.md)."""
    with np.load(os.path.join(FIXTURES, "adm_crops.npz")) as f:
        cases = [(f[f"input{i}"], int(f[f"size{i}"]), f[f"crop{i}"]) for i in range(len(f.files) // 3)]
    assert len(cases) == 5
    for image, size, official in cases:
        ours = np.array(center_crop_arr(Image.fromarray(image), size))
        assert ours.shape == official.shape == (size, size, 3)
        assert np.array_equal(ours, official), f"{image.shape} -> {size}: {np.abs(ours - official.astype(int)).max()}"


# Runs main() like `python main_fractalgen.py` on each rank, recording the first MAR mask
# drawn in training and keeping a copy of the online-eval images before they are deleted.
RANK_WRAPPER = """
import json, os, shutil, sys, types
sys.path.insert(0, {repo!r})
import engine_fractalgen
from models import mar
from main_fractalgen import get_args_parser, main

out = {out!r}
first_masks = []
choose_mask = mar.MAR.choose_mask
def recording_choose_mask(self, batch, device):
    mask = choose_mask(self, batch, device)
    if self.training and self.fixed_masking is None and not first_masks:  # not the memory estimate's pass
        first_masks.append(mask.int().tolist())
    return mask
mar.MAR.choose_mask = recording_choose_mask

def keep_then_remove(folder, **kwargs):
    shutil.copytree(folder, os.path.join(out, "kept"))
    shutil.rmtree(folder, **kwargs)
engine_fractalgen.shutil = types.SimpleNamespace(rmtree=keep_then_remove)

result = main(get_args_parser().parse_args(sys.argv[1:]))
with open(os.path.join(out, "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump({{"first_mask": first_masks[0], "train": result["train"]}}, f)
"""


def test_two_ranks_draw_their_own_masks_use_adamw_095_and_score_fid_like_one_process(
        tiny_data, fid_stats, inception_weights, tmp_path, child_env):
    """Two gloo processes train fractalmar_tiny for an epoch with online FID (12 images,
    batches of 5: rank 0 makes 7, rank 1 makes 5). Wrong variants: every rank seeded like
    rank 0 (same masks and dropout everywhere); AdamW betas (0.9, 0.999); features gathered
    in rank order instead of image order, or FID numbers that differ from one process
    scoring the PNG folder."""
    out = tmp_path / "run"
    out.mkdir()
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(RANK_WRAPPER.format(repo=REPO, out=str(out)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", wrapper,
           "--model", "fractalmar_tiny", "--data_path", tiny_data, "--output_dir", out, "--device", "cpu",
           "--batch_size", 2, "--epochs", 1, "--warmup_epochs", 1, "--num_workers", 0, "--online_eval",
           "--num_images", 12, "--gen_bsz", 5, "--num_iter_list", "2,2",
           "--fid_stats_path", fid_stats, "--inception_weights", inception_weights]
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=child_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    assert ranks[0]["first_mask"] != ranks[1]["first_mask"], "both ranks drew the same masks"

    ckpt = load_checkpoint(str(out / "checkpoint-last.pth"))
    assert [tuple(g["betas"]) for g in ckpt["optimizer"]["param_groups"]] == [(0.9, 0.95), (0.9, 0.95)]

    kept = out / "kept"
    assert sorted(os.listdir(kept)) == [f"{i:05d}.png" for i in range(12)]
    one_process = fid.evaluate_folder(str(kept), fid_stats, torch.device("cpu"), inception_weights)
    online = ranks[0]["train"]
    # equal up to float32 rounding in the Inception network (other batch shapes and thread
    # counts in the two processes than in this one): FID ~1e-8 relative, IS ~1e-7
    assert online["fid"] == pytest.approx(one_process["fid"], rel=1e-6)
    assert online["inception_score"] == pytest.approx(one_process["inception_score"], rel=1e-5)
    assert online["inception_score_std"] == pytest.approx(one_process["inception_score_std"], rel=1e-3, abs=1e-6)
