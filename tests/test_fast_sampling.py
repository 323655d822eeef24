"""The fast sampler (`generate(fast=...)`): static-shape decode steps draw from the same
distribution as the official sampler.

The fast path draws other random numbers, so images cannot be compared one by one:
instead >= 200 images from each path (same weights, same settings) are reduced to
per-image statistics and compared with a two-sample Kolmogorov-Smirnov test. A broken
variant (temperature dividing the logits instead of multiplying them) must fail the same
test, so the test can tell.
"""

from unittest import mock

import pytest
import torch
from scipy.stats import ks_2samp

from models import FractalGen
from models import fractalgen as fractalgen_module
from models import layers
from models import mar as mar_module
from models.ar import AR
from models.mar import MAR
from models.layers import StaticKVCache, attend
from models.pixelloss import PixelLoss, bucket_size
from util.benchmark import native_bf16
from util.misc import autocast

NUM_IMAGES = 240
SETTINGS = dict(num_iter_list=(4, 4), cfg=2.0, cfg_schedule="linear", temperature=0.6, filter_threshold=1e-4)
P_SAME = 1e-3  # the same distribution passes with this margin (p is uniform under the null)
P_BROKEN = 1e-6  # a broken sampler must be rejected far below it


def tiny_model(types):
    """4x4 images, 2x2 patches: a few steps per level. The output biases are made large
    and the widths small so that pixel distributions are peaked and depend on the
    temperature (random init alone gives near-uniform pixels, where any sampler passes)."""
    torch.manual_seed(0)
    model = FractalGen(img_size_list=(4, 2, 1), embed_dim_list=(32, 16, 16), num_blocks_list=(1, 1, 1),
                       num_heads_list=(2, 2, 2), generator_type_list=types,
                       num_conds=5 if types[0] == "mar" else 1, class_num=4).eval()
    head = model.next_fractal.next_fractal
    with torch.no_grad():
        for mlm in head.heads():
            mlm.bias.copy_(torch.randn(1, 256) * 4)
    return model


def image_statistics(model, fast, seed, precision="fp32"):
    torch.manual_seed(seed)
    labels = torch.arange(NUM_IMAGES) % 4
    with autocast(torch.device("cpu"), precision):
        images = model.generate(labels, fast=fast, **SETTINGS).float()  # (N, 3, 4, 4)
    flat = images.flatten(1)
    # mean brightness, contrast and the red channel: what temperature and guidance move
    return {"mean": flat.mean(1), "std": flat.std(1), "red": images[:, 0].flatten(1).mean(1)}


def min_ks_pvalue(a, b):
    return min(ks_2samp(a[k].numpy(), b[k].numpy()).pvalue for k in a)


@pytest.fixture(autouse=True)
def one_intra_op_thread(one_thread):
    pass


@pytest.fixture(scope="module", params=[("ar", "ar", "ar"), ("mar", "mar", "ar")], ids=["ar", "mar"])
def model_and_reference(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_model(request.param)
        yield model, image_statistics(model, False, seed=1)
    finally:
        torch.set_num_threads(threads)


def test_static_steps_sample_the_official_distribution(model_and_reference, monkeypatch):
    model, reference = model_and_reference
    fast = image_statistics(model, "eager", seed=2)
    p_same = min_ks_pvalue(reference, fast)
    assert p_same > P_SAME, p_same

    # negative control: temperature dividing the logits (0.6 -> x1.67 instead of x0.6)
    draw = PixelLoss.draw_pixels
    monkeypatch.setattr(PixelLoss, "draw_pixels", lambda self, cond, temperature, *rest:
                        draw(self, cond, 1 / temperature, *rest))
    broken = image_statistics(model, "eager", seed=2)
    p_broken = min_ks_pvalue(reference, broken)
    assert p_broken < P_BROKEN, p_broken


@pytest.mark.slow
@pytest.mark.parametrize("fast", [True, "frozen"])
def test_compiled_steps_sample_the_official_distribution(model_and_reference, fast):
    model, reference = model_and_reference
    compiled = image_statistics(model, fast, seed=3)
    assert min_ks_pvalue(reference, compiled) > P_SAME


@pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="this CPU has no native bf16 (AVX512-BF16 / AMX)")
@pytest.mark.parametrize("fast", [False, "eager"])
def test_bf16_samples_the_fp32_distribution(model_and_reference, fast):
    """The benchmark's bf16 rows (torch.autocast) time a sampler with the same distribution."""
    model, reference = model_and_reference
    bf16 = image_statistics(model, fast, seed=4, precision="bf16")
    assert min_ks_pvalue(reference, bf16) > P_SAME


# ---------------------------------------------------------------- the pieces
def test_static_cache_attention_equals_growing_cache():
    """Step by step, attention over the preallocated, masked buffer gives the growing
    cache's result (rounding only: the masked slots add exact zeros)."""
    torch.manual_seed(0)
    B, nh, S, hd = 3, 2, 7, 8
    q, k, v = (torch.randn(B, nh, S, hd) for _ in range(3))
    full = attend(q, k, v, causal=True)
    (kbuf, vbuf), = StaticKVCache.buffers(B, nh, S, hd, q, 1)
    for t in range(S):
        pos = torch.tensor([t])
        out = attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], causal=True,
                     cache=StaticKVCache(kbuf, vbuf, pos))
        torch.testing.assert_close(out, full[:, :, t:t + 1], rtol=1e-5, atol=1e-6)
    assert torch.equal(kbuf, k) and torch.equal(vbuf, v)  # written in place at each position


def test_static_prefill_is_causal():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    (kbuf, vbuf), = StaticKVCache.buffers(2, 2, 9, 4, q, 1)
    out = attend(q, k, v, cache=StaticKVCache(kbuf, vbuf, torch.arange(5)))
    torch.testing.assert_close(out, attend(q, k, v, causal=True), rtol=1e-5, atol=1e-6)


def test_bucket_sizes_are_the_next_power_of_two():
    assert [bucket_size(n) for n in (1, 2, 3, 4, 5, 8, 9, 200)] == [1, 2, 4, 4, 8, 8, 16, 256]


@pytest.mark.parametrize("seq_len, num_steps", [(16, 4), (256, 16), (4, 4), (16, 16), (16, 64)])
def test_static_schedule_matches_the_official_masking(seq_len, num_steps):
    """The host-side schedule of the fast MAR sampler: the counts of the official
    sampler's loop (all patches unknown), every patch generated exactly once."""
    schedule = mar_module.static_schedule(seq_len, min(seq_len, num_steps))
    masked = torch.tensor([seq_len])
    steps = min(seq_len, num_steps)
    for step, (mask_len, count) in enumerate(schedule):
        expected_len = mar_module.cosine_mask_len(torch.tensor([seq_len]), masked, step, steps)
        assert mask_len == int(expected_len)
        after = 0 if step == steps - 1 else int(expected_len)
        assert count == int(masked) - after >= 1
        masked = torch.tensor([after])
    assert sum(count for _, count in schedule) == seq_len


def test_fast_mar_generates_every_patch_once(monkeypatch):
    """Every patch of the fast MAR sampler is written by exactly one step."""
    model = tiny_model(("mar", "mar", "ar"))
    writes = []
    scatter = torch.Tensor.scatter_

    def counting_scatter(self, dim, index, src):
        if self.shape[1:] == (4, 12):  # level 0: 4 patches of 3 x 2 x 2 per image
            writes.append(index[..., 0].clone())
        return scatter(self, dim, index, src)

    monkeypatch.setattr(torch.Tensor, "scatter_", counting_scatter)
    model.generate([0, 1, 2], fast="eager", **SETTINGS)
    positions = torch.cat(writes, dim=1)
    assert positions.shape == (3, 4)
    assert torch.equal(positions.sort(dim=1).values, torch.arange(4).expand(3, 4))


@pytest.mark.parametrize("types", [("ar", "ar", "ar"), ("mar", "mar", "ar")], ids=["ar", "mar"])
def test_static_steps_never_read_a_tensor_on_the_host(types, monkeypatch):
    """No .item(), bool(), int(), float(), .tolist() or .nonzero() anywhere in the fast
    sampler: each would be a device sync on CUDA and a graph break under torch.compile."""
    model = tiny_model(types)
    settings = dict(SETTINGS, fast="eager")
    with torch.no_grad():
        cond = [torch.cat([model.class_emb(torch.tensor([0, 1])), model.fake_latent.expand(2, -1)])] * 5
        model.sample(cond, fractal_level=0, **settings)  # fills the host-side schedule caches

        def sync(self, *args, **kwargs):
            raise AssertionError("host sync in the fast sampler")

        for name in ("item", "__bool__", "__int__", "__float__", "tolist", "nonzero"):
            monkeypatch.setattr(torch.Tensor, name, sync)
        images = model.sample(cond, fractal_level=0, **settings)
    assert images.shape == (2, 3, 4, 4)


def test_fast_path_keeps_conditional_generation_exact():
    """With known pixels the fast flag takes the official path: known pixels stay."""
    model = tiny_model(("mar", "mar", "ar"))
    known = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mask = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    mask[:, :, :2] = True
    torch.manual_seed(0)
    fast = model.generate([0, 1], known=known, known_mask=mask, fast=True, **SETTINGS)
    torch.manual_seed(0)
    exact = model.generate([0, 1], known=known, known_mask=mask, **SETTINGS)
    assert torch.equal(fast, exact) and torch.equal(fast[mask], known[mask])


def test_fast_flag_is_checked():
    model = tiny_model(("ar", "ar", "ar"))
    with pytest.raises(ValueError, match="fast must be"):
        model.generate([0], fast="yes", **SETTINGS)


# ---------------------------------------------------------------- frozen weights
def test_frozen_graphs_are_dropped_when_the_weights_change(monkeypatch):
    """fast="frozen" graphs hold copies of the weights: an in-place update (an optimizer
    step), load_state_dict or a move must drop them; unchanged weights must not."""
    dropped = []
    monkeypatch.setattr(torch._dynamo.eval_frame, "remove_from_cache", dropped.append)
    monkeypatch.setattr(layers, "FROZEN_STEPS", [AR.decode_patch])
    monkeypatch.setattr(layers, "_weights_seen", layers.weakref.WeakKeyDictionary())
    model, other = tiny_model(("ar", "ar", "ar")), tiny_model(("ar", "ar", "ar"))
    layers.forget_stale_steps(model)
    layers.forget_stale_steps(other)
    layers.forget_stale_steps(model)
    assert dropped == []  # first sight and unchanged weights keep the graphs
    with torch.no_grad():
        model.generator.cond_emb.weight.add_(1.0)
    layers.forget_stale_steps(other)
    assert dropped == []  # the other model did not change
    layers.forget_stale_steps(model)
    assert dropped == [AR.decode_patch]
    layers.forget_stale_steps(model)
    assert dropped == [AR.decode_patch]  # once per change
    model.load_state_dict(other.state_dict())
    layers.forget_stale_steps(model)
    assert len(dropped) == 2
    model.float()  # a no-op conversion moves nothing
    layers.forget_stale_steps(model)
    assert len(dropped) == 2


def test_frozen_sampling_checks_the_weights_once_per_call(monkeypatch):
    """generate(fast="frozen") runs the check at the top level only, and the other modes
    not at all (their graphs read the weights as inputs)."""
    seen = []
    monkeypatch.setattr(fractalgen_module, "forget_stale_steps", seen.append)
    monkeypatch.setattr(layers, "_compiled", lambda fn, dynamic, frozen: fn)  # no compilation in the suite
    model = tiny_model(("ar", "ar", "ar"))
    model.generate([0, 1], fast="frozen", **SETTINGS)
    assert seen == [model]
    model.generate([0, 1], fast=True, **SETTINGS)
    model.generate([0, 1], fast="eager", **SETTINGS)
    assert seen == [model]


def test_frozen_only_where_it_pays(monkeypatch):
    """Frozen graphs are CPU code for small static steps: on another device, with dynamic
    shapes (MAR levels) or above FROZEN_MAX_ROWS rows "frozen" compiles like fast=True."""
    seen = []
    monkeypatch.setattr(layers, "_compiled", lambda fn, dynamic, frozen: seen.append(frozen) or fn)
    step, most = AR.decode_patch, layers.FROZEN_MAX_ROWS
    layers.step_function(step, "frozen", device=torch.device("cpu"), rows=2)
    layers.step_function(step, "frozen", device="cpu", rows=most)
    layers.step_function(step, "frozen", device="cpu", rows=most + 1)
    layers.step_function(step, "frozen", device="cpu", rows=2, dynamic=True)
    layers.step_function(step, "frozen", device="cuda:0", rows=2)
    layers.step_function(step, True, device="cpu", rows=2)
    assert layers.step_function(step, "eager", rows=2) is step
    assert seen == [True, True, False, False, False, False]


@pytest.mark.parametrize("batch, cfg, frozen", [(32, 1.0, True), (64, 1.0, True), (65, 1.0, False),
                                                (32, 2.0, True), (33, 2.0, False), (64, 2.0, False)])
def test_frozen_choice_counts_every_row_a_step_multiplies(batch, cfg, frozen, monkeypatch):
    """fast="frozen" freezes a step only up to FROZEN_MAX_ROWS (64) matmul rows: with
    guidance a step multiplies the conditional and the unconditional rows, padded to a
    power of two at the pixel head. So 32 guided images freeze every step (AR levels and
    the fused pixel draw), 33 freeze none (66 rows, 128 at the pixel head)."""
    seen = []
    monkeypatch.setattr(layers, "_compiled", lambda fn, dynamic, frozen: seen.append((fn.__name__, frozen)) or fn)
    model = tiny_model(("ar", "ar", "ar"))
    model.generate(torch.arange(batch) % 4, fast="frozen", **dict(SETTINGS, cfg=cfg))
    names = {name for name, _ in seen}
    assert {"decode_tokens", "draw_and_decode", "draw_pixels"} <= names
    assert {is_frozen for _, is_frozen in seen} == {frozen}, seen


def test_frozen_pixel_head_counts_both_halves_of_a_guided_draw(monkeypatch):
    """The pixel head on its own (a guiding pixel, the fused step off): 64 guided rows
    are 128 matmul rows, 32 are 64."""
    seen = []
    monkeypatch.setattr(layers, "_compiled", lambda fn, dynamic, frozen: seen.append(frozen) or fn)
    torch.manual_seed(0)
    head = PixelLoss(c_channels=8, width=16, depth=1, num_heads=2).eval()
    for n, cfg in ((64, 2.0), (32, 2.0), (64, 1.0), (65, 1.0)):
        rows = n * (2 if cfg != 1.0 else 1)
        assert head.sample([torch.randn(rows, 8)], 1.0, cfg, 0.0, fast="frozen").shape == (n, 3)
    assert seen == [False, True, True, False]


@pytest.mark.slow
def test_frozen_graphs_follow_changed_weights():
    """Compiled with frozen weights, then the weights change in place: the next call must
    sample with the new weights. With temperature 1e3 the draws are argmax draws, so the
    frozen path and the eager static steps give the same pixels (up to near ties)."""
    sharp = dict(SETTINGS, cfg=1.0, temperature=1e3)
    model, other = tiny_model(("ar", "ar", "ar")), tiny_model(("ar", "ar", "ar"))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    labels = torch.arange(16) % 4

    def agree(a, b):
        return (a == b).float().mean().item()
    first = model.generate(labels, fast="frozen", **sharp)
    assert agree(first, model.generate(labels, fast="eager", **sharp)) > 0.95
    model.load_state_dict(other.state_dict())
    new = model.generate(labels, fast="eager", **sharp)
    assert agree(first, new) < 0.5  # the change is visible
    assert agree(model.generate(labels, fast="frozen", **sharp), new) > 0.95


def test_frozen_step_falls_back_when_it_cannot_compile(monkeypatch):
    """Inductor's C++ GEMM has limits (NoValidChoicesError): such a step must run as with
    fast=True, with one warning, and leave the freezing flag as it was."""
    calls = []

    def fake_compile(fn, dynamic=False, options=None):
        if options is None:
            return lambda *args: calls.append("plain") or fn(*args)

        def frozen(*args):
            calls.append(("frozen", torch._inductor.config.freezing))
            raise RuntimeError("NoValidChoicesError: No choices to select\n(details)")
        return frozen

    def double(x):
        return 2 * x
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(layers, "FROZEN_STEPS", [])
    step = layers._compiled.__wrapped__(double, False, True)
    with pytest.warns(UserWarning, match="could not be compiled with frozen weights.*No choices to select"):
        assert step(3) == 6
    assert step(4) == 8
    assert calls == [("frozen", True), "plain", "plain"]  # tried once with freezing on, then plain
    assert torch._inductor.config.freezing is False
    assert layers.FROZEN_STEPS == [double]


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_fused_pixel_steps_equal_the_separate_steps(cfg, monkeypatch):
    """Above the pixel head the fast AR level fuses each draw with the next decode step.
    Uncompiled, with rows that need no padding, that must give the separate steps' pixels
    bit for bit (the same random numbers in the same order): a misplaced cache position or
    condition would change them, which the KS test's per-image statistics may not see."""
    from models import ar as ar_module
    model = tiny_model(("ar", "ar", "ar"))
    with torch.no_grad():  # pixels that depend on their conditions, not on the output biases
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(3)
        for mlm in model.next_fractal.next_fractal.heads():
            mlm.bias.zero_()
    labels = torch.arange(4) % 4
    settings = dict(SETTINGS, cfg=cfg)
    torch.manual_seed(0)
    fused = model.generate(labels, fast="eager", **settings)
    monkeypatch.setattr(ar_module, "FUSE_PIXEL_STEPS", False)
    torch.manual_seed(0)
    separate = model.generate(labels, fast="eager", **settings)
    assert torch.equal(fused, separate)


# ---------------------------------------------------------------- the fast MAR level, step by step
class HandDown:
    """Stands in for the level below a MAR level: records what each step hands down (the
    rows of conditions, cfg, temperature, filter) and returns patches computed from the
    conditional rows, so the same conditions give the same patches."""

    def __init__(self, halves):
        self.halves, self.calls = halves, []

    def __call__(self, cond_list, cfg, temperature, filter_threshold, known=None, known_mask=None):
        rows = torch.cat(cond_list, dim=1)  # (halves * N, num_conds * D): every condition of a row
        n = rows.shape[0] // self.halves
        # a row: its conditional conditions, then its unconditional twin's
        self.calls.append(dict(rows=torch.cat(rows.split(n), dim=1), cfg=cfg, temperature=temperature,
                               filter_threshold=filter_threshold))
        return torch.tanh(cond_list[0][:n, :3]).reshape(n, 3, 1, 1)


def same_rows(fast, official, atol=1e-5):
    """Whether the rows of two (N, C) tensors are the same set (any order): each fast row's
    nearest official row, a distinct one for every fast row, within atol."""
    if fast.shape != official.shape:
        return False
    distance = torch.cdist(fast.double(), official.double())
    nearest = distance.argmin(dim=1)
    return len(set(nearest.tolist())) == len(nearest) and distance.min(dim=1).values.max().item() < atol


@pytest.mark.parametrize("batch, cfg, schedule, num_iter, next_conds, guiding", [
    (2, 3.0, "linear", 4, 5, False),     # five conditions: the neighbours of each patch go down too
    (3, 1.0, "constant", 5, 5, False),   # rows padded to 4
    (3, 2.5, "linear", 16, 1, False),    # one patch per step, the middle condition only
    (2, 2.0, "constant", 3, 5, True),    # a guiding pixel among the tokens; constant cfg
], ids=["cfg-neighbours", "nocfg-padded", "one-per-step", "guiding-pixel"])
def test_fast_mar_level_hands_down_what_the_official_level_does(batch, cfg, schedule, num_iter, next_conds,
                                                                guiding, monkeypatch):
    """Fed the same patch order, the fast MAR sampler hands the next level, step by step,
    the same patches (how many, which ones), the same conditions (the transformer saw the
    same visible and masked patches; the four neighbours' outputs, zeros across the
    border), the same cfg schedule, temperature and filter as the official sampler, and
    builds the same image. The KS test of whole images cannot see an error in any one of
    these. The fast path takes its random permutation front to back and the official one
    back to front, so the official run gets the random numbers reversed (1 - u)."""
    torch.manual_seed(0)
    mar = MAR(seq_len=16, patch_size=1, cond_embed_dim=8, embed_dim=16, num_blocks=2, num_heads=2,
              num_conds=5, guiding_pixel=guiding).eval()
    mar.num_next_conds = next_conds
    with torch.no_grad():  # outputs that differ clearly from patch to patch
        mar.pos_embed_learned.normal_(0, 1.0)
        mar.mask_token.normal_(0, 1.0)
    halves = 1 + (cfg != 1.0)
    cond = [torch.randn(halves * batch, 8) for _ in range(5)]
    if guiding:  # the same guiding pixels on both paths (their draw is tested with the pixel head)
        colours = torch.rand(batch, 3)
        monkeypatch.setattr(mar.guiding_pixel_loss, "sample", lambda *args, **kwargs: colours)
    uniform = torch.rand(bucket_size(batch), mar.seq_len)
    settings = dict(num_iter=num_iter, cfg=cfg, cfg_schedule=schedule, temperature=0.7, filter_threshold=1e-3)

    def run(fast, numbers):
        hand_down = HandDown(halves)
        with mock.patch.object(torch, "rand", lambda *shape, **kwargs: numbers[:shape[0]].clone()):
            image = mar.sample(cond, next_level_sample_function=hand_down, fast=fast, **settings)
        return image, hand_down.calls

    fast_image, fast_calls = run("eager", uniform)
    official_image, official_calls = run(False, 1 - uniform)

    assert len(fast_calls) == len(official_calls) == min(num_iter, mar.seq_len)
    for step, (fast, official) in enumerate(zip(fast_calls, official_calls)):
        assert fast["cfg"] == pytest.approx(official["cfg"]), step
        assert (fast["temperature"], fast["filter_threshold"]) == (0.7, 1e-3)
        assert (official["temperature"], official["filter_threshold"]) == (0.7, 1e-3)
        assert fast["rows"].shape == official["rows"].shape, step
        assert same_rows(fast["rows"], official["rows"]), step
    torch.testing.assert_close(fast_image, official_image, atol=1e-5, rtol=0)
