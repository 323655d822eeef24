"""FID / IS / precision-recall through torch-fidelity's real Inception code path, offline
(randomly initialised weights of the right architecture), and the `util.fid_stats` tool."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

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


def _write_pngs(folder, count, seed, size=16):
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8))
    os.makedirs(folder)
    for i, image in enumerate(images):
        Image.fromarray(image.numpy()).save(os.path.join(folder, f"{i:05d}.png"))
    return images.permute(0, 3, 1, 2)  # (N, 3, H, W) uint8


def test_features_gathered_in_pieces_score_like_torch_fidelity_on_the_folder(tmp_path, inception_weights):
    """The generation path (features of in-memory images added in pieces, in any order, as
    the ranks produce them) gives torch-fidelity's own calculate_metrics numbers on the
    PNG folder: FID (against the statistics of a reference folder), IS (10 shuffled splits,
    which depend on the image order) and precision/recall."""
    import torch_fidelity
    # random Inception weights predict nearly uniform classes (IS ~1.00004, hardly order-
    # dependent); sharper logits make IS, and so the order of the images, count
    state = torch.load(inception_weights, weights_only=True)
    state["fc.weight"] *= 30
    inception_weights = str(tmp_path / "sharp-inception.pth")
    torch.save(state, inception_weights)
    generated = _write_pngs(str(tmp_path / "gen"), 20, seed=3)
    _write_pngs(str(tmp_path / "ref"), 4, seed=4)
    cpu = torch.device("cpu")
    inception = fid.build_inception(cpu, inception_weights)
    bank = fid.FeatureBank(inception, batch_size=4)
    for ids in (range(6, 13), range(0, 6), range(13, 20)):  # pieces out of order, as from several ranks
        bank.add(generated[ids.start:ids.stop], ids)
    real = fid.extract_features(fid.list_images(str(tmp_path / "ref")), inception, cpu)
    ours = fid.compute_metrics(bank.gather(cpu), fid.mean_and_cov(real[fid.FID_FEATURE]), real)

    theirs = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "gen"), input2=str(tmp_path / "ref"), cuda=False, fid=True, isc=True, prc=True,
        feature_extractor="inception-v3-compat", feature_layer_fid="2048", feature_layer_isc="logits_unbiased",
        feature_layer_prc="2048", feature_extractor_weights_path=inception_weights, save_cpu_ram=True,
        cache=False, verbose=False)
    # torch-fidelity keeps mu in float32 (we in float64) and batches differently: rounding only
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert ours["inception_score"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours["inception_score_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-4)
    assert (ours["precision"], ours["recall"]) == (theirs["precision"], theirs["recall"])
    # the image order matters for IS (it picks the splits): in the order the pieces came it is off
    _, as_added = bank.local()
    off = fid.inception_score(as_added[fid.IS_FEATURE])[0] - theirs["inception_score_mean"]
    assert abs(off) > 1e-4 * theirs["inception_score_mean"], off


@pytest.mark.parametrize("bad", ["mu", "sigma"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_statistics_with_nan_or_inf_are_refused_before_anything_runs(bad, value, tmp_path):
    """A NaN anywhere in the reference statistics would make every FID NaN after hours of
    generation: the file is refused up front (main_fractalgen.py loads it before building
    the model), naming it, whichever array holds it."""
    mu, sigma = np.zeros(2048), np.eye(2048)
    (mu if bad == "mu" else sigma)[7] = value
    path = str(tmp_path / "stats.npz")
    np.savez(path, mu=mu, sigma=sigma)
    with pytest.raises(UserInputError, match=r"stats\.npz.*NaN or infinite"):
        fid.load_stats(path)


class ThreadRanks:
    """`world` ranks as threads in one process: util.misc's rank queries and row gather,
    answered per thread (the gather waits for every rank, as the collective does)."""

    def __init__(self, world):
        import threading
        self.world, self.local = world, threading.local()
        self.barrier = threading.Barrier(world, timeout=300)
        self.slots = [None] * world

    def patch(self, monkeypatch):
        from util import misc
        monkeypatch.setattr(misc, "get_rank", lambda: self.local.rank)
        monkeypatch.setattr(misc, "get_world_size", lambda: self.world)
        monkeypatch.setattr(misc, "is_main_process", lambda: self.local.rank == 0)
        monkeypatch.setattr(misc, "all_gather_rows", self.all_gather_rows)

    def all_gather_rows(self, rows, device):
        self.slots[self.local.rank] = rows.cpu()
        self.barrier.wait()
        gathered = torch.cat(self.slots)
        self.barrier.wait()
        return gathered

    def run(self, fn):
        """fn() on every rank; returns the results in rank order (raises the first error)."""
        import threading
        results, errors = [None] * self.world, []

        def rank(r):
            self.local.rank = r
            try:
                results[r] = fn()
            except BaseException as e:  # noqa: BLE001 -- re-raised below
                errors.append(e)
                self.barrier.abort()  # the other ranks stop waiting
        threads = [threading.Thread(target=rank, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def test_features_of_files_split_over_ranks_come_back_whole_and_in_file_order(tmp_path, inception_weights,
                                                                             monkeypatch):
    """util.fid_stats and --prc_ref_dir with several processes: each rank reads every
    world_size-th file, and every rank gets the features of all files in file order, as
    one process computes them (5 files over 2 ranks: shards of 3 and 2)."""
    _write_pngs(str(tmp_path / "ref"), 5, seed=5)
    files = fid.list_images(str(tmp_path / "ref"))
    cpu = torch.device("cpu")
    inception = fid.build_inception(cpu, inception_weights)
    alone = fid.extract_features(files, inception, cpu, batch_size=2)
    ranks = ThreadRanks(2)
    ranks.patch(monkeypatch)
    read = []
    load = fid.load_rgb
    monkeypatch.setattr(fid, "load_rgb", lambda path: read.append((ranks.local.rank, path)) or load(path))
    for features in ranks.run(lambda: fid.extract_features(files, inception, cpu, batch_size=2)):
        for name, value in alone.items():
            torch.testing.assert_close(features[name], value, rtol=1e-5, atol=1e-5)
    assert sorted(read) == sorted((i % 2, f) for i, f in enumerate(files))  # each file once, by its rank
