"""util/benchmark.py on a tiny configuration, and the exactness of the speed-ups it measures.

No timing assertions: the numbers depend on the machine. What must hold everywhere is that
the table and the JSON carry every field, and that each fast path computes the same floats
as the straightforward one (so sampling with a fixed seed is unchanged by it).
"""
import json
import os

import pytest
import torch

from models import FractalGen, from_uint8, layers
from models import mar as mar_module
from models.ar import apply_rope, rope_2d_table, rope_factors
from models.pixelloss import sample_categorical
from util import benchmark

TINY_ARGS = ["--configs", "tiny", "--steps", "1", "--warmup", "0", "--threads", "2"]
# --threads sets the process's torch threads: one_thread (conftest) puts them back afterwards
pytestmark = pytest.mark.usefixtures("one_thread")


def test_benchmark_runs_and_reports_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = benchmark.main(TINY_ARGS + ["--json", str(out)])
    text = capsys.readouterr().out
    for column in ("train img/s", "eval img/s", "sample s/img", "sampling per image", "GFLOP per image"):
        assert column in text
    for name in ("L0 mar", "L1 mar", "pixel head"):
        assert name in text

    saved = json.loads(out.read_text())
    assert saved["machine"]["threads"] == 2 and saved["matmul_flop_s"]["fp32"] > 0
    (row,) = saved["results"]
    assert row["config"] == "tiny" and row["precision"] == "fp32" and row["compile"] is False
    assert row["train"]["images_per_s"] > 0 and row["eval"]["images_per_s"] > 0
    assert row["sample"]["s_per_image"] > 0
    levels = row["sample"]["levels_s_per_image"]
    assert set(levels) == {"L0 mar", "L1 mar", "pixel head", "outside levels"}
    # exclusive times add up to the total
    assert sum(levels.values()) == pytest.approx(row["sample"]["s_per_image"], rel=1e-6)
    assert row["sample"]["calls"]["L0 mar"] == 1 and row["sample"]["calls"]["pixel head"] >= 1
    assert row["train"]["flops_per_image"] > row["eval"]["flops_per_image"] > 0
    assert row["sample"]["flops_per_image"] > 0
    assert all(v > 0 for v in row["sample"]["levels_flops_per_image"].values())
    # exclusive FLOPs of the levels add up to the whole
    assert sum(row["sample"]["levels_flops_per_image"].values()) == pytest.approx(row["sample"]["flops_per_image"])
    for phase in ("train", "eval", "sample"):
        assert 0 < row[phase]["fraction_of_matmul_peak"]
    assert report["results"][0]["config"] == "tiny"


def test_benchmark_bf16_row_and_phase_selection(capsys):
    report = benchmark.main(TINY_ARGS + ["--precision", "bf16", "--phases", "eval", "--no_flops"])
    text = capsys.readouterr().out
    if not benchmark.native_bf16(torch.device("cpu")):
        assert report["results"] == [] and "no native bf16" in text
        return
    (row,) = report["results"]
    assert row["precision"] == "bf16" and "eval" in row and "train" not in row and "sample" not in row
    assert "bf16" in text


def test_benchmark_fast_and_batch_rows(capsys, monkeypatch):
    """--fast off on and --sample_batch 1 2: one sampling row each; training and eval only
    in the first row of the configuration (they depend on neither). The fast steps run
    uncompiled here (compiling takes minutes on a busy 2-core machine; the slow test below
    compiles)."""
    monkeypatch.setattr(layers, "_compiled", lambda fn, dynamic, frozen: fn)
    report = benchmark.main(TINY_ARGS + ["--no_flops", "--fast", "off", "on", "frozen", "--sample_batch", "1", "2",
                                         "--phases", "eval", "sample"])
    rows = report["results"]
    assert [(r["fast"], r["sample"]["batch"]) for r in rows] == [(False, 1), (False, 2), (True, 1), (True, 2),
                                                                 ("frozen", 1), ("frozen", 2)]
    assert "eval" in rows[0] and not any("eval" in r for r in rows[1:])
    assert all("first_call_s_per_image" in r["sample"] for r in rows[2:])
    out = capsys.readouterr().out
    assert "first call (cold" in out
    table_rows = [line.split()[3] for line in out.splitlines() if line.startswith("tiny ")]
    assert table_rows[-6:] == ["no", "no", "yes", "yes", "frz", "frz"]  # the final table's fast column


def test_benchmark_ema_rate_reports_the_update_time_and_size(capsys):
    report = benchmark.main(TINY_ARGS + ["--phases", "train", "--no_flops", "--steps", "2", "--ema_rate", "0.99"])
    train = report["results"][0]["train"]
    params = report["results"][0]["params"]
    assert train["ema_rate"] == 0.99 and train["ema_bytes"] == 4 * params
    assert 0 < train["ema_update_s"] < train["step_s"]
    assert "EMA (rate 0.99): " in capsys.readouterr().out


def test_hyphenated_flags_still_work():
    args = benchmark.parse_args(["--train-batch", "3", "--num-iter", "2", "2", "--no-flops", "--sample-batch", "1"])
    assert args.train_batch == 3 and args.num_iter == [2, 2] and args.flops is False and args.sample_batch == [1]
    assert "--train-batch" not in benchmark_help()  # hidden: --help shows the underscore spelling
    assert "--train_batch" in benchmark_help()


def benchmark_help():
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        benchmark.parse_args(["--help"])
    return out.getvalue()


BAD_ARGS = [(["--configs", "nope"], "unknown config"), (["--num_iter", "0"], "--num_iter must be at least 1"),
            (["--sample_batch", "0"], "--sample_batch must be at least 1"),
            (["--threads", "0"], "--threads must be at least 1"), (["--cfg", "nan"], "--cfg must be a finite"),
            (["--ema_rate", "1"], "--ema_rate must be a number strictly between 0 and 1"),
            (["--checkpoint", "/nonexistent.pth"], "no such file"), (["--device", "tpu"], "not a device")]
if not torch.cuda.is_available():
    BAD_ARGS.append((["--device", "cuda"], "CUDA is not available"))


@pytest.mark.parametrize("argv, message", BAD_ARGS)
def test_benchmark_bad_arguments_fail_with_one_sentence(argv, message):
    with pytest.raises(SystemExit) as err:
        benchmark.main(argv)
    assert message in str(err.value)


class CreatesMarker:
    """Unpickling this runs os.system: a loader that honours it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_flag_loads_weights_only(tmp_path):
    """--checkpoint goes through util.checkpoint (weights_only=True): a crafted pickle is
    refused in one sentence and its payload never runs; a real checkpoint loads."""
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.pth"
    torch.save({"model": CreatesMarker(marker)}, crafted)
    with pytest.raises(SystemExit) as err:
        benchmark.main(TINY_ARGS + ["--checkpoint", str(crafted), "--phases", "eval", "--no_flops"])
    assert "refusing to load" in str(err.value) and "weights_only=False" not in str(err.value)
    assert not marker.exists()

    torch.manual_seed(3)
    model = FractalGen(**benchmark.BENCH_CONFIGS["tiny"])
    good = tmp_path / "good.pth"
    torch.save({"model": model.state_dict()}, good)
    loaded = benchmark.build_model("tiny", torch.device("cpu"), str(good))
    assert torch.equal(loaded.class_emb.weight, model.class_emb.weight)
    with pytest.raises(benchmark.UserInputError, match="does not fit"):
        benchmark.build_model("bench64", torch.device("cpu"), str(good))


def test_flop_formula_counts_a_linear():
    sections = benchmark.Sections()
    x, w = torch.randn(7, 16), torch.randn(32, 16)
    with sections("a"), sections.count_flops():
        torch.nn.functional.linear(x, w)
    assert sections.flops["a"] == 2 * 7 * 16 * 32


# ---------------------------------------------------------------- exactness of the fast paths
def test_sample_categorical_draws_exactly_like_multinomial():
    probs = torch.softmax(torch.randn(64, 256) * 3, dim=-1)
    torch.manual_seed(0)
    expected = torch.multinomial(probs, 1).squeeze(-1)
    torch.manual_seed(0)
    assert torch.equal(sample_categorical(probs), expected)


def test_rope_matches_the_complex_rotation_bit_for_bit():
    table = rope_2d_table(4, 16)  # (17, 8, 2)
    x = torch.randn(3, 17, 2, 16)
    pairs = x.reshape(3, 17, 2, 8, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    expected = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(3)
    assert torch.equal(apply_rope(x, *rope_factors(table)), expected)


def bench_like(types=("mar", "mar", "ar"), size=32):
    torch.manual_seed(0)
    return FractalGen(img_size_list=(size, 4, 1), embed_dim_list=(64, 32, 16), num_blocks_list=(2, 1, 1),
                      num_heads_list=(4, 2, 2), generator_type_list=types, num_conds=5, class_num=10).eval()


@pytest.mark.parametrize("neighbours", [True, False])
def test_mar_last_block_on_kept_positions_equals_full_pass(neighbours):
    """The rows the last block keeps are bitwise those of the full pass."""
    model = bench_like()
    mar = model.generator  # 8x8 grid of 4x4 patches
    torch.manual_seed(1)
    B, L = 6, mar.seq_len
    patches = torch.randn(B, L, 48)
    mask = torch.rand(B, L) < 0.7
    cond = [torch.randn(B, 64) for _ in range(5)]
    to_predict = mask & (torch.rand(B, L) < 0.2)
    to_predict[:, 0] = True
    keep = mar_module.needed_positions(to_predict, mar.grid_size, neighbours)
    assert keep.shape[1] % mar_module.KEEP_MULTIPLE == 0 and keep.shape[1] < L
    with torch.no_grad():
        full = mar.predict(patches, mask, cond)
        kept = mar.predict(patches, mask, cond, keep)
    assert torch.equal(kept, full.gather(1, keep.unsqueeze(-1).expand_as(kept)))


@pytest.mark.parametrize("types", [("mar", "mar", "ar"), ("mar", "ar", "ar")])
def test_sampling_and_eval_unchanged_by_skipping_unread_positions(monkeypatch, types):
    model = bench_like(types)
    imgs = from_uint8(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))

    def run():
        torch.manual_seed(5)
        with torch.no_grad():
            losses = torch.stack([model(imgs, torch.arange(4)) for _ in range(3)])
        return model.generate([1, 2, 3], num_iter_list=(16, 4), cfg=2.0), losses

    fast = run()
    monkeypatch.setattr(mar_module, "needed_positions",
                        lambda rows, grid_size, neighbours: torch.arange(rows.shape[1]).expand_as(rows))
    slow = run()
    assert torch.equal(fast[0], slow[0])  # the same pixels
    assert torch.equal(fast[1], slow[1])  # the same NLL, bit for bit


def test_pixel_head_without_blue_token_matches_the_four_token_pass():
    model = bench_like()
    head = model.next_fractal.next_fractal
    torch.manual_seed(2)
    target = from_uint8(torch.randint(0, 256, (50, 3, 1, 1), dtype=torch.uint8)).reshape(50, 3)
    cond = [torch.randn(50, 32)]
    with torch.no_grad():
        torch.manual_seed(0)
        logits, ids = head.predict(target, cond)
        x = torch.stack([head.cond_proj(cond[0]), head.r_codebook(ids[:, 0]), head.g_codebook(ids[:, 1]),
                         head.b_codebook(ids[:, 2])], dim=1)  # (N, 4, W): the full sequence
        x = head.ln(x)
        for block in head.blocks:
            x = block(x)
        x = head.norm(x)
        expected = torch.stack([head.channel_logits(x[:, c], c) for c in range(3)], dim=1)
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_benchmark_compile_row_runs():
    report = benchmark.main(TINY_ARGS + ["--compile", "on", "--no_flops", "--phases", "eval", "sample"])
    (row,) = report["results"]
    assert row["compile"] is True and row["sample"]["s_per_image"] > 0


@pytest.mark.slow
def test_benchmark_compiled_fast_row_runs():
    report = benchmark.main(TINY_ARGS + ["--fast", "on", "--no_flops", "--phases", "sample"])
    (row,) = report["results"]
    assert row["fast"] is True and row["sample"]["first_call_s_per_image"] > 0
