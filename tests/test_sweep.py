"""`python -m util.sweep`: a cfg x temperature sweep scored by FID (offline: conftest's
randomly initialised Inception), the best row, resuming, --store and bad grids."""
import argparse
import json
import os

import pytest
import torch
from PIL import Image

from models import create_model, load_model
from util import checkpoint as ckpt_util
from util import fid, sweep, validation

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = "fractalmar_tiny"
# 2 cfg x 2 temperatures at 2 iterations per level: 4 settings of 4 images, seconds each
GRID = ["--cfg", "1,3", "--temperature", "0.5,1.5", "--num_iter_list", "2,2", "--num_images", "4"]


@pytest.fixture
def ckpt(tmp_path):
    """An (untrained) tiny MAR checkpoint as main_fractalgen.py writes it, 2 classes."""
    torch.manual_seed(0)
    model = create_model(TINY, class_num=2)
    path = str(tmp_path / "run" / "checkpoint-last.pth")
    os.makedirs(os.path.dirname(path))
    ckpt_util.save_checkpoint({"model": model.state_dict(), "epoch": 7, "args": argparse.Namespace(model=TINY),
                               "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


def run_sweep(ckpt, inception_weights, *extra):
    return sweep.main(["--resume", os.path.dirname(ckpt), "--inception_weights", inception_weights, "--device", "cpu",
                       "--num_workers", "0", *GRID, *map(str, extra)])


class Counting:
    """Stands in for evaluate_gen: records the settings generated, runs the real one, and
    raises KeyboardInterrupt (Ctrl-C) instead on call number `stop_at`."""

    def __init__(self, real, stop_at=None):
        self.real, self.calls, self.stop_at = real, [], stop_at

    def __call__(self, model, args, **kwargs):
        self.calls.append((args.cfg, args.temperature))
        if len(self.calls) == self.stop_at:
            raise KeyboardInterrupt
        return self.real(model, args, **kwargs)


@pytest.fixture
def counting(monkeypatch):
    real = sweep.evaluate_gen

    def make(stop_at=None):
        wrapper = Counting(real, stop_at)
        monkeypatch.setattr(sweep, "evaluate_gen", wrapper)
        return wrapper
    return make


@pytest.mark.slow  # 4 settings, each FID a 2048x2048 matrix square root: minutes on a busy CPU
def test_sweep_marks_the_lowest_fid_caches_the_statistics_and_stores_the_winner(
        ckpt, tiny_data, fid_stats, inception_weights, counting, monkeypatch, capsys):
    before = ckpt_util.load_checkpoint(ckpt)
    result = run_sweep(ckpt, inception_weights, "--data_path", tiny_data, "--store")
    out = capsys.readouterr().out
    rows, best = result["rows"], result["best"]

    # the grid, each setting scored once; the marked row is the lowest FID of the grid
    assert sorted((r["setting"]["cfg"], r["setting"]["temperature"]) for r in rows) == [
        (1.0, 0.5), (1.0, 1.5), (3.0, 0.5), (3.0, 1.5)]
    fids = [r["metrics"]["fid"] for r in rows]
    assert len(set(fids)) == 4, "settings that score alike cannot tell a best row"
    assert fids[best] == min(fids)
    marked = [line for line in result["table"].splitlines() if "<- best" in line]
    assert len(marked) == 1 and marked[0].startswith("*")
    assert sweep.format_fid(min(fids)) in marked[0].split()
    assert "<- best" in out and "4 class-balanced images per setting" in out

    # the statistics are computed once from the data's train/ images, centre-cropped, and
    # cached beside the checkpoint (conftest's fid_stats are those of the same images)
    stats = result["stats_path"]
    assert os.path.dirname(stats) == os.path.dirname(ckpt)
    assert abs(fid.load_stats(stats)[0] - fid.load_stats(fid_stats)[0]).max() < 1e-6

    # pictures: a contact-sheet row per setting, a heat map
    with Image.open(result["sheet"]) as sheet, Image.open(result["heat_map"]) as heat:
        assert sheet.height > 4 * sweep.SHEET_TILE and heat.width >= 2 * sweep.CELL[0]
    recorded = json.load(open(os.path.join(result["output_dir"], sweep.RESULTS_NAME)))["results"]
    assert len(recorded) == 4

    # --store: the winner is the checkpoint's sampling setting, the official keys untouched
    after = ckpt_util.load_checkpoint(ckpt)
    winner = rows[best]["setting"]
    assert after["sampling"] == {**winner, "num_iter_list": [2, 2]}
    assert after["sampling_source"]["by"] == "sweep" and after["sampling_source"]["num_images"] == 4
    assert after["epoch"] == before["epoch"] and vars(after["args"]) == vars(before["args"])
    assert after["optimizer"] == before["optimizer"]
    assert all(torch.equal(after["model"][k], v) for k, v in before["model"].items())

    # load_model(...).generate() samples with the winner from then on
    model = load_model(ckpt)
    assert model.sampling_config() == {**winner, "num_iter_list": (2, 2)}
    torch.manual_seed(3)
    default = model.generate([0, 1])
    torch.manual_seed(3)
    explicit = model.generate([0, 1], **{**winner, "num_iter_list": (2, 2)})
    assert torch.equal(default, explicit)

    # a second run finds everything done: no generation, statistics not recomputed
    wrapper = counting()
    monkeypatch.setattr(fid, "extract_features", lambda *a, **k: pytest.fail("statistics recomputed"))
    again = run_sweep(ckpt, inception_weights, "--data_path", tiny_data)
    assert wrapper.calls == [] and again["best"] == best
    assert "cached" in capsys.readouterr().out


def test_an_interrupted_sweep_resumes_marks_the_lowest_fid_and_stores_it(
        ckpt, tiny_data, inception_weights, counting, monkeypatch, capsys):
    """The default suite's end-to-end sweep (2 settings, 2 FIDs): Ctrl-C in the second
    setting; the rerun generates only that one, reuses the cached statistics of the data,
    marks the lower FID and stores it, which load_model(...).generate() then uses."""
    grid = ("--cfg", "1,3", "--temperature", "1", "--data_path", tiny_data, "--store")
    first = counting(stop_at=2)
    with pytest.raises(SystemExit) as stop:
        run_sweep(ckpt, inception_weights, *grid)
    assert stop.value.code == 130
    results = os.path.join(os.path.dirname(ckpt), "sweep", sweep.RESULTS_NAME)
    done = json.load(open(results))["results"]
    assert [(r["setting"]["cfg"], r["setting"]["temperature"]) for r in done] == first.calls[:1] == [(1.0, 1.0)]
    assert "sampling" not in ckpt_util.load_checkpoint(ckpt)  # nothing stored by an unfinished sweep
    capsys.readouterr()

    second = counting()
    monkeypatch.setattr(fid, "extract_features", lambda *a, **k: pytest.fail("statistics recomputed"))
    result = run_sweep(ckpt, inception_weights, *grid)
    assert second.calls == [(3.0, 1.0)]
    assert "(1 already done" in capsys.readouterr().out
    assert json.load(open(results))["results"][0] == done[0]  # the first run's record, kept as it was
    rows, best = result["rows"], result["best"]
    assert [r["setting"]["cfg"] for r in rows] == [1.0, 3.0]
    fids = [r["metrics"]["fid"] for r in rows]
    assert fids[0] != fids[1] and fids[best] == min(fids)
    marked = [line for line in result["table"].splitlines() if "<- best" in line]
    assert len(marked) == 1 and marked[0].startswith("*") and sweep.format_fid(min(fids)) in marked[0].split()
    assert os.path.dirname(result["stats_path"]) == os.path.dirname(ckpt)

    winner = {**rows[best]["setting"], "num_iter_list": (2, 2)}
    stored = ckpt_util.load_checkpoint(ckpt)
    assert stored["sampling"] == {**winner, "num_iter_list": [2, 2]} and stored["sampling_source"]["fid"] == min(fids)
    model = load_model(ckpt)
    assert model.sampling_config() == winner and model.sampling_origins()["cfg"]["by"] == "sweep"
    torch.manual_seed(3)
    default = model.generate([0, 1])
    torch.manual_seed(3)
    assert torch.equal(default, model.generate([0, 1], **winner))


def test_results_are_reused_only_for_the_same_measurement():
    """Another image count, seed, reference or checkpoint is another measurement."""
    setting = dict(num_iter_list=[2, 2], cfg=1.0, cfg_schedule="linear", temperature=1.0, filter_threshold=1e-4)
    context = {"weights": "abc", "reference": "def", "num_images": 4, "seed": 0}
    results = [{"context": context, "setting": setting, "metrics": {"fid": 1.0}}]
    assert sweep.find_result(results, dict(context), {**setting, "num_iter_list": (2, 2)}) is results[0]
    for key, value in [("num_images", 8), ("seed", 1), ("reference", "xyz"), ("weights", "retrained")]:
        assert sweep.find_result(results, {**context, key: value}, setting) is None
    assert sweep.find_result(results, context, {**setting, "cfg": 2.0}) is None


def test_the_best_row_is_the_lowest_fid_wherever_it_is():
    def rows(fids):
        return [{"setting": dict(cfg=float(i), temperature=1.0, num_iter_list=[2, 2]),
                 "metrics": {"fid": f, "inception_score": 1.0}, "sec_per_image": 0.1} for i, f in enumerate(fids)]
    for fids, best in [([3.0, 1.0, 2.0], 1), ([1.0, 2.0, 3.0], 0), ([3.0, 2.0, 1.0], 2), ([2.0, 1.0, 1.0], 1)]:
        assert sweep.best_index(rows(fids)) == best
        lines = sweep.format_table(rows(fids), best, 4).splitlines()
        assert [i for i, line in enumerate(lines[1:]) if line.startswith("*")] == [best]
        assert lines[best + 1].endswith("<- best (lowest FID)")


def test_the_report_marks_and_stores_the_lowest_fid_of_this_grid_only(ckpt, tmp_path, capsys):
    """report() on recorded results (no generation): the rows are this grid's settings under
    this measurement; a lower FID recorded under another measurement (other weights) or for a
    setting outside the grid is neither marked nor stored. The stored source names the FID,
    the image count and the checkpoint position the sweep measured."""
    model = load_model(ckpt)
    base = dict(num_iter_list=[2, 2], cfg_schedule="linear", temperature=1.0, filter_threshold=1e-4)
    settings = [dict(base, cfg=float(c)) for c in (1, 2, 3, 4)]
    context = {"weights": "now", "num_images": 4}

    def entry(setting, value, ctx=context):
        return {"context": ctx, "setting": setting, "metrics": {"fid": value, "inception_score": 1.0},
                "sec_per_image": 0.1, "folder": str(tmp_path / "gone")}
    results = [entry(dict(base, cfg=9.0), 0.1),                                   # not in this grid
               entry(settings[3], 4.0),
               entry(settings[2], 0.5, {"weights": "before", "num_images": 4}),  # another measurement
               entry(settings[0], 3.0), entry(settings[2], 2.0), entry(settings[1], 1.5)]
    stats = tmp_path / "stats.npz"
    args = argparse.Namespace(num_images=4, seed=0, sheet_images=2, store=True, inception_weights=None)
    result = sweep.report(args, model, settings, results, context, ckpt, str(stats), str(tmp_path / "out"))
    assert result["best"] == 1 and [r["metrics"]["fid"] for r in result["rows"]] == [3.0, 1.5, 2.0, 4.0]
    assert [line.split()[1] for line in result["table"].splitlines() if line.startswith("*")] == ["2"]
    stored = ckpt_util.load_checkpoint(ckpt)
    assert stored["sampling"] == settings[1]
    source = stored["sampling_source"]
    assert (source["by"], source["fid"], source["num_images"], source["settings_tried"]) == ("sweep", 1.5, 4, 4)
    assert (source["epoch"], source["step"], source["reference"]) == (7, 0, str(stats))
    assert "stored in" in capsys.readouterr().out
    assert load_model(ckpt).sampling_config()["cfg"] == 2.0


def test_a_result_is_redone_when_anything_it_depends_on_changes(ckpt, tmp_path):
    """run_context: the weights, the reference file, the image count, the seed, precision,
    sampler, Inception weights and precision/recall reference each make another measurement."""
    model = load_model(ckpt)
    for name, text in (("a.npz", "a"), ("b.npz", "b"), ("w1", "1"), ("w2", "2")):
        (tmp_path / name).write_text(text)
    args = argparse.Namespace(num_images=4, seed=0, precision="fp32", fast_sampling="off",
                              inception_weights=str(tmp_path / "w1"), prc_ref_dir=None)
    base = sweep.run_context(args, model, str(tmp_path / "a.npz"))
    assert sweep.run_context(argparse.Namespace(**vars(args)), load_model(ckpt), str(tmp_path / "a.npz")) == base
    for key, value in [("num_images", 8), ("seed", 1), ("precision", "bf16"), ("fast_sampling", "compiled"),
                       ("inception_weights", str(tmp_path / "w2")), ("prc_ref_dir", str(tmp_path))]:
        assert sweep.run_context(argparse.Namespace(**{**vars(args), key: value}), model,
                                 str(tmp_path / "a.npz")) != base, key
    assert sweep.run_context(args, model, str(tmp_path / "b.npz")) != base
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert sweep.run_context(args, model, str(tmp_path / "a.npz")) != base


def test_storing_the_same_settings_with_another_source_rewrites_the_source(ckpt):
    settings = dict(num_iter_list=[2, 2], cfg=2.0, cfg_schedule="linear", temperature=1.0, filter_threshold=1e-4)
    assert ckpt_util.store_sampling(ckpt, settings, {"by": "quick start"})
    mtime = os.stat(ckpt).st_mtime_ns
    assert not ckpt_util.store_sampling(ckpt, dict(settings), {"by": "quick start"})  # nothing new: not rewritten
    assert os.stat(ckpt).st_mtime_ns == mtime
    assert ckpt_util.store_sampling(ckpt, settings, {"by": "sweep", "fid": 3.0})
    assert ckpt_util.load_checkpoint(ckpt)["sampling_source"] == {"by": "sweep", "fid": 3.0}


@pytest.mark.parametrize("flags, message", [
    (["--cfg", "-1"], r"--cfg must be a finite number of 0 or more, got -1"),
    (["--cfg", ""], r"--cfg '' is empty"),
    (["--cfg", "1,,2"], r"--cfg '1,,2' has an empty entry"),
    (["--cfg", "two"], r"--cfg must be a number, got 'two'"),
    (["--temperature", "0"], r"--temperature must be a finite number above 0, got 0"),
    (["--temperature", "1,nan"], r"--temperature must be a finite number above 0"),
    (["--num_iter_list", "0,2"], r"--num_iter_list '0,2' must hold positive integers"),
    (["--num_iter_list", "a"], r"--num_iter_list 'a' must be comma-separated integers"),
    (["--num_images", "0"], r"--num_images must be at least 1"),
    (["--gen_bsz", "0"], r"--gen_bsz must be at least 1"),
    (["--sheet_images", "0"], r"--sheet_images must be at least 1"),
    (["--num_workers", "-1"], r"--num_workers must be at least 0"),
    (["--filter_threshold", "1"], r"--filter_threshold must be below 1"),
])
def test_bad_grids_get_one_line_before_any_work(tmp_path, flags, message, capsys):
    """Checked before the checkpoint is even looked for (--resume names nothing here)."""
    import re
    missing = str(tmp_path / "absent")
    with pytest.raises(SystemExit) as stop:
        sweep.main(["--resume", missing, "--fid_stats_path", "x.npz", *flags])
    text = str(stop.value.code)
    assert text.startswith("error: ") and "\n" not in text and re.search(message, text), text
    assert not os.path.exists(missing)


def test_a_sweep_needs_a_reference(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: FID needs reference statistics: pass --data_path DATA"):
        sweep.main(["--resume", str(tmp_path / "absent"), "--cfg", "1,2"])


def test_duplicate_grid_values_are_tried_once():
    assert validation.parse_sampling_grid("1,2,1", "1.0,1", ["2,2", "2, 2", "4,2"]) == ([1.0, 2.0], [1.0],
                                                                                      [(2, 2), (4, 2)])


def test_iteration_lists_must_fit_the_models_levels(ckpt, fid_stats, inception_weights, monkeypatch):
    monkeypatch.setattr(sweep, "evaluate_gen", lambda *a, **k: pytest.fail("generation started"))
    with pytest.raises(SystemExit, match=r"--num_iter_list 2,2,2 has 3 entries but fractalmar_tiny has 2 generator "
                                         r"levels; give one per level"):
        sweep.main(["--resume", os.path.dirname(ckpt), "--fid_stats_path", fid_stats, "--inception_weights",
                    inception_weights, "--device", "cpu", "--num_iter_list", "2,2", "2,2,2"])
    assert not os.path.exists(os.path.join(os.path.dirname(ckpt), "sweep"))


def test_num_images_must_balance_the_classes(ckpt, fid_stats, inception_weights):
    with pytest.raises(SystemExit, match=r"--num_images 3 is not divisible by class_num 2"):
        run_sweep(ckpt, inception_weights, "--fid_stats_path", fid_stats, "--num_images", 3)
    assert not os.path.exists(os.path.join(os.path.dirname(ckpt), "sweep"))


@pytest.mark.slow
def test_two_processes_split_the_images_and_compute_the_statistics_together(
        ckpt, tiny_data, inception_weights, child_env, capsys):
    """torchrun, 2 CPU processes over gloo: every setting's images come from both ranks (ids
    0..N-1 once), the cached statistics are written once, the winner stored; a later
    one-process run finds everything done."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "util.sweep",
           "--resume", os.path.dirname(ckpt), "--inception_weights", inception_weights, "--device", "cpu",
           "--num_workers", "0", "--data_path", tiny_data, "--cfg", "1,3", "--temperature", "1",
           "--num_iter_list", "2,2", "--num_images", "4", "--gen_bsz", "1", "--store"]
    proc = subprocess.run(cmd, cwd=repo, env=child_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "distributed: 2 processes, backend gloo" in proc.stdout
    assert proc.stdout.count("generated 4 images") == 2 and proc.stdout.count("<- best") == 1
    folders = [d for d in os.listdir(os.path.join(os.path.dirname(ckpt), "sweep")) if d.startswith("gen-")]
    for folder in folders:  # ids 0..3, two written by each rank
        assert sorted(os.listdir(os.path.join(os.path.dirname(ckpt), "sweep", folder))) == [
            f"{i:05d}.png" for i in range(4)]
    assert ckpt_util.load_checkpoint(ckpt)["sampling_source"]["by"] == "sweep"
    result = run_sweep(ckpt, inception_weights, "--data_path", tiny_data, "--cfg", "1,3", "--temperature", "1")
    assert "(2 already done" in capsys.readouterr().out and len(result["rows"]) == 2
