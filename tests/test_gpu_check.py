"""util/gpu_check.py as a CPU dry run (--device cpu --small): the same code the GPU run
executes, on the tiny configurations. No timing assertions (the machine decides them);
what must hold is that every section passes, reports its numbers, and reports a failure
when there is one."""
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from util import gpu_check

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
# The official code, where this machine has a copy (tests pass without it: its timing is skipped)
OFFICIAL_CANDIDATES = [os.environ.get("FRACTALGEN_OFFICIAL_DIR", ""), str(REPO / "official" / "fractalgen"),
                       "/work/official/fractalgen"]
OFFICIAL = next((d for d in OFFICIAL_CANDIDATES if d and os.path.isdir(os.path.join(d, "models"))), None)
TIMING = ("timing_sample", "timing_train", "timing_latency")
pytestmark = pytest.mark.usefixtures("one_thread")  # a busy 2-core machine thrashes with more


def run_check(out, *extra):
    argv = ["--out", str(out), "--device", "cpu", "--small", *map(str, extra)]
    report = gpu_check.run(gpu_check.get_args_parser().parse_args(argv))
    saved = json.loads((Path(out) / "gpu_check.json").read_text())
    assert saved["sections"].keys() == report["sections"].keys()
    return saved


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine thrashes with more
    try:
        out = tmp_path_factory.mktemp("gpu_check")
        official = OFFICIAL or str(out / "no-official-code")
        return out, run_check(out, "--official_dir", official, "--pairs", 1, "--profile")
    finally:
        torch.set_num_threads(before)


def test_dry_run_passes_every_section_and_writes_json_and_markdown(dry_run):
    out, report = dry_run
    assert report["mode"] == "small" and report["machine"]["device"] == "cpu"
    expected = set(gpu_check.SECTIONS)
    assert set(report["sections"]) == expected
    for name, section in report["sections"].items():
        wanted = "skipped" if name in TIMING and OFFICIAL is None else "pass"
        assert section["status"] == wanted, (name, section.get("error"), section.get("traceback"))
        assert section["seconds"] >= 0
    markdown = (out / "gpu_check.md").read_text()
    for name in expected:
        assert f"## {name}: " in markdown
    assert not [p for p in os.listdir(out) if ".tmp-" in p]


def test_dry_run_golden_parity_within_tolerance(dry_run):
    rows = dry_run[1]["sections"]["golden"]["rows"]
    # AR eval, 4 fixed-mask variants for each MAR case, in two precisions, plus train loss and grad norm
    assert len(rows) == (1 + 4 + 4) * 2 + 3 * 2
    for row in rows:
        assert row["pass"] and row["rel_err"] <= row["tol"], row
        assert row["tol"] == {"fp32": 1e-4, "bf16": 1e-2}[row["precision"]] or row["check"] == "train grad norm"
    fp32 = [r for r in rows if r["precision"] == "fp32" and r["check"] != "train grad norm"]
    assert max(r["rel_err"] for r in fp32) < 1e-5  # on the CPU the fp32 numbers are the official ones


def test_dry_run_train_sample_and_torchrun_results(dry_run):
    sections = dry_run[1]["sections"]
    train = sections["train"]["rows"]
    assert {(r["config"], r["precision"]) for r in train} == {
        (c, p) for c in ("fractalar_tiny", "fractalmar_tiny") for p in ("bf16", "fp16")}
    for row in train:
        assert len(row["losses"]) == 2 and row["params_without_grad"] == 0 and row["peak_mem_gib"] > 0
    sample = sections["sample"]["rows"]
    assert len(sample) == 4 and all(r["max_off_grid"] <= gpu_check.GRID_TOL and r["generate_uint8_shape"]
                                    for r in sample)
    (run,) = sections["torchrun"]["rows"]
    assert run["backend"] == "gloo" and run["joined_group"] and run["optimizer_steps"] == 2
    top = sections["profile"]["rows"]
    assert top and all(r["calls"] >= 1 for r in top)
    assert os.path.isfile(sections["profile"]["table"])


@pytest.mark.skipif(OFFICIAL is None, reason="no copy of the official code on this machine")
def test_dry_run_times_against_the_official_code(dry_run):
    sections = dry_run[1]["sections"]
    for name in TIMING:
        section = sections[name]
        assert {r["side"] for r in section["rows"]} == {"official", "ours"}
        assert section["speedup"] > 0
    huge = sections["timing_sample"]
    assert huge["settings"]["cfg"] == 19.0 and huge["paper"]["s_per_image"] == 1.29
    assert all(r["est_paper_s_per_image"] > r["s_per_image"] for r in huge["rows"])  # 2,2 -> 64,16 iterations
    assert set(huge["flops"]["levels_per_image"]) == {"L0 mar", "L1 mar", "pixel head"}
    assert all(0 < f < 1 for f in huge["flops"]["levels_fraction_of_bf16_matmul_rate"].values())
    assert sections["timing_latency"]["settings"]["cfg"] == 11.0


def test_missing_official_code_skips_timing_with_a_reason(tmp_path):
    missing = tmp_path / "nowhere"
    report = run_check(tmp_path, "--official_dir", missing, "--sections", *TIMING)
    for name in TIMING:
        section = report["sections"][name]
        assert section["status"] == "skipped"
        assert str(missing) in section["reason"] and "git clone" in section["reason"]
    assert report["summary"] == {"skipped": 3}


def test_a_wrong_golden_value_is_reported_as_a_failure(tmp_path):
    golden = tmp_path / "golden"
    golden.mkdir()
    for name in gpu_check.GOLDEN_CASES:
        shutil.copy(FIXTURES / f"{name}.pth", golden)
    case = torch.load(golden / "case_ar.pth", weights_only=True)
    case["eval_loss"] *= 1 + 2e-4  # just outside the fp32 tolerance
    torch.save(case, golden / "case_ar.pth")
    report = run_check(tmp_path / "out", "--golden_dir", golden, "--sections", "golden")
    section = report["sections"]["golden"]
    assert section["status"] == "fail"
    failed = [(r["case"], r["check"], r["precision"]) for r in section["rows"] if not r["pass"]]
    assert failed == [("case_ar", "eval", "fp32")]  # bf16's 1e-2 still holds


def test_a_tighter_tolerance_fails_the_bf16_rows(tmp_path):
    report = run_check(tmp_path, "--sections", "golden", "--bf16_tol", 1e-7)
    rows = report["sections"]["golden"]["rows"]
    assert report["sections"]["golden"]["status"] == "fail"
    assert not any(r["pass"] for r in rows if r["precision"] == "bf16")
    assert all(r["pass"] for r in rows if r["precision"] == "fp32")


def test_an_error_in_one_section_keeps_the_others(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(gpu_check, "section_golden", broken)
    report = run_check(tmp_path, "--sections", "environment", "golden")
    assert report["sections"]["environment"]["status"] == "pass"
    golden = report["sections"]["golden"]
    assert golden["status"] == "error" and "illegal memory access" in golden["error"]
    assert "Traceback" in golden["traceback"]


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu"], "add --small"),
    (["--small", "--device", "cpu", "--golden_dir", "/nonexistent"], "has no case_ar.pth"),
    (["--small", "--device", "cpu", "--sample_kwargs", "fast"], "is not JSON"),
    (["--small", "--device", "cpu", "--sample_kwargs", "[1]"], "must be a JSON object"),
    (["--small", "--device", "cpu", "--huge_num_iter", "8,0"], "positive integers"),
])
def test_bad_arguments_stop_with_one_sentence_before_any_work(tmp_path, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        gpu_check.main(["--out", str(out), *argv])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


def test_off_grid_samples_fail_the_grid_check(monkeypatch):
    model = gpu_check.build_ours("fractalmar_tiny", torch.device("cpu")).eval()
    settings = gpu_check.sampling_settings("fractalmar_tiny", model, (2, 2))
    assert settings["cfg"] > 1  # with guidance (the tiny DEFAULT_SAMPLING has cfg 2; cfg 1 would skip it)
    args = ("fractalmar_tiny", model, torch.device("cpu"), "fp32", 1, settings, {})
    assert gpu_check.sample_row(*args)["pass"]
    on_grid = gpu_check.official_api_sample
    monkeypatch.setattr(gpu_check, "official_api_sample", lambda *a: on_grid(*a) + 3e-4)
    row = gpu_check.sample_row(*args)
    assert not row["pass"] and row["max_off_grid"] == pytest.approx(3e-4, rel=1e-2)


def test_alternate_times_both_sides_in_alternating_order_and_reports_the_speedup():
    calls = []

    def run(side, seconds):
        return lambda: (calls.append(side), time.sleep(seconds))
    seconds, speedup = gpu_check.alternate({"official": run("official", 0.04), "ours": run("ours", 0.01)}, 3,
                                           torch.device("cpu"))
    assert calls == ["official", "ours", "ours", "official", "official", "ours"]
    assert len(seconds["official"]) == len(seconds["ours"]) == 3
    assert 2 < speedup < 5  # about 4: official / ours


def test_batch_choice_and_extrapolation():
    # 10 s at batch 4 with a 45 s budget: batch 16 (40 s); never above max_batch
    assert gpu_check.choose_batch(10.0, 4, 45.0, 1024) == 16
    assert gpu_check.choose_batch(1.0, 4, 1e6, 64) == 64
    assert gpu_check.choose_batch(100.0, 4, 45.0, 1024) == 4
    # half the time in L0 (2 -> 8 iterations: x4), half in the pixel head (unchanged)
    assert gpu_check.extrapolate({"L0 mar": 1.0, "pixel head": 1.0}, (2,), (8,)) == pytest.approx(2.5)
    assert gpu_check.extrapolate({"L0 mar": 1.0, "L1 mar": 3.0}, (2, 4), (4, 16)) == pytest.approx(3.5)


def test_model_config_records_the_factory_keywords():
    config = gpu_check.model_config("fractalmar_huge_in256", class_num=7)
    assert config["embed_dim_list"] == [1280, 640, 320, 64] and config["guiding_pixel"] is True
    assert config["num_conds"] == 5 and config["class_num"] == 7


@pytest.mark.skipif(OFFICIAL is None, reason="no copy of the official code on this machine")
def test_the_official_code_loads_beside_ours_with_the_same_weights():
    import models
    ours, official = gpu_check.official_pair("fractalmar_tiny", OFFICIAL, torch.device("cpu"))
    assert type(official).__module__ == "models.fractalgen" and type(official) is not models.FractalGen
    assert sys.modules["models"] is models and sys.modules["models.fractalgen"].FractalGen is models.FractalGen
    assert Path(sys.modules["util"].__file__).parent == REPO / "util"
    theirs = official.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
