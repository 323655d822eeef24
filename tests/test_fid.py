"""FID / IS / precision-recall through torch-fidelity's real Inception code path, offline
(randomly initialised weights of the right architecture), and the `util.fid_stats` tool."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from util import fid
from util.misc import UserInputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def test_stats_tool_then_a_folder_scores_zero_against_its_own_statistics(
        tiny_data, inception_weights, fid_stats, tmp_path, child_env):
    """`python -m util.fid_stats` on a folder, then FID of that folder against the file: ~0;
    precision and recall against itself: 1."""
    val = os.path.join(tiny_data, "val")
    out = str(tmp_path / "stats" / "val_stats.npz")
    proc = subprocess.run([sys.executable, "-m", "util.fid_stats", "--images", val, "--out", out,
                           "--inception_weights", inception_weights, "--device", "cpu", "--num_workers", "0"],
                          cwd=REPO, env=child_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "5 images" in proc.stdout
    with np.load(out) as f:
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048)

    metrics = fid.evaluate_folder(val, out, torch.device("cpu"), inception_weights, prc_ref_dir=val)
    assert abs(metrics["fid"]) < 1e-6
    assert metrics["inception_score"] >= 1.0 - 1e-6 and np.isfinite(metrics["inception_score_std"])
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    # the train images' statistics are far away, so ~0 above is not an artefact of tiny features
    assert fid.frechet_distance(fid.load_stats(out), fid.load_stats(fid_stats)) > 1.0


def test_missing_inputs_name_the_fix(tmp_path, inception_weights):
    with pytest.raises(UserInputError, match=r"nope\.npz not found; pass --fid_stats_path FILE\.npz, or write one "
                                             r"from real images with `python -m util\.fid_stats"):
        fid.check_stats_file(str(tmp_path / "nope.npz"))
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(UserInputError, match="lacks the arrays 'mu' and 'sigma'"):
        fid.load_stats(str(tmp_path / "bad.npz"))
    with pytest.raises(UserInputError, match="--inception_weights .*absent.pth does not exist"):
        fid.build_inception(torch.device("cpu"), str(tmp_path / "absent.pth"))
    with pytest.raises(UserInputError, match="no images"):
        fid.list_images(str(tmp_path))


def test_unreadable_image_is_named(tmp_path, inception_weights):
    (tmp_path / "broken.png").write_bytes(b"garbage")
    inception = fid.build_inception(torch.device("cpu"), inception_weights)
    with pytest.raises(UserInputError, match=r"cannot read image .*broken\.png"):
        fid.extract_features(fid.list_images(str(tmp_path)), inception, torch.device("cpu"))
