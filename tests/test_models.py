"""Architecture, semantics and error handling of the models package."""
import math

import pytest
import torch

from golden import manifest
from models import (DEFAULT_SAMPLING, MODELS, AR, MAR, CheckpointMismatchError, FractalGen, PixelLoss,
                    create_model, fixed_masking, from_uint8)
from models.layers import patchify, unpatchify
from models.pixelloss import guided_logits

OFFICIAL = ["fractalar_in64", "fractalmar_in64", "fractalmar_base_in256", "fractalmar_large_in256",
            "fractalmar_huge_in256"]

# tiny variants of every generator mix the architecture supports
MIXES = {
    "ar_ar": dict(generator_type_list=("ar", "ar", "ar"), num_conds=1),
    "mar_mar": dict(generator_type_list=("mar", "mar", "ar"), num_conds=5),
    "mar_ar": dict(generator_type_list=("mar", "ar", "ar"), num_conds=5),
    "ar_mar1": dict(generator_type_list=("ar", "mar", "ar"), num_conds=1),
    "mar3_gp": dict(img_size_list=(8, 4, 2, 1), embed_dim_list=(32, 16, 16, 8), num_blocks_list=(1, 1, 1, 1),
                    num_heads_list=(2, 2, 2, 2), generator_type_list=("mar", "mar", "mar", "ar"),
                    num_conds=5, guiding_pixel=True),
}


def tiny(**overrides):
    config = dict(img_size_list=(8, 4, 1), embed_dim_list=(32, 16, 8), num_blocks_list=(1, 1, 1),
                  num_heads_list=(2, 2, 2), generator_type_list=("mar", "ar", "ar"), class_num=4,
                  num_conds=5, r_weight=5.0)
    config.update(overrides)
    return FractalGen(**config)


def images(batch, size, seed=0):
    """Random valid images, ImageNet-normalised."""
    g = torch.Generator().manual_seed(seed)
    return from_uint8(torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8))


# ---------------------------------------------------------------- checkpoint compatibility
@pytest.mark.parametrize("name", OFFICIAL)
def test_official_configs_match_manifest_on_meta(name):
    reference = manifest()["models"][name]
    with torch.device("meta"):
        model = create_model(name, **reference["kwargs"])
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert sorted(got) == sorted(reference["state_dict"])
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == reference["trainable_params"]


@pytest.mark.parametrize("name", OFFICIAL)
def test_factories_set_architecture_defaults(name):
    """Without explicit keywords each factory builds the official architecture."""
    reference = manifest()["models"][name]
    with torch.device("meta"):
        model = MODELS[name]()
    assert sum(p.numel() for p in model.parameters()) == reference["trainable_params"]


def test_explicit_keywords_override_factory_defaults():
    with torch.device("meta"):
        model = MODELS["fractalmar_in64"](num_conds=1, class_num=10)
    assert model.generator.pos_embed_learned.shape == (1, 256 + 1, 1024)
    assert model.class_emb.weight.shape == (10, 1024)


def test_registry_and_defaults_cover_every_model():
    assert set(OFFICIAL) <= set(MODELS)
    assert set(DEFAULT_SAMPLING) == set(MODELS)
    with pytest.raises(ValueError, match="unknown model 'fractal_nope'.*fractalmar_in64"):
        create_model("fractal_nope")


def test_checkpoint_of_another_configuration_names_the_difference():
    with torch.device("meta"):
        mar = create_model("fractalmar_in64")
        ar = create_model("fractalar_in64")
    with pytest.raises(CheckpointMismatchError) as err:
        ar.load_state_dict(mar.state_dict())
    message = str(err.value)
    assert "generator.pos_embed_learned checkpoint [1, 261, 1024] vs model [1, 257, 1024]" in message
    assert "key(s) missing from the checkpoint: " in message
    assert "unexpected key(s) in the checkpoint: " in message and "more" in message


# ---------------------------------------------------------------- shared pieces
def test_patchify_layout_and_inverse():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 4, 12)
    # token 1 is the top-right 2x2 patch, laid out (channel, row, column)
    expected = torch.stack([x[0, c, 0:2, 2:4] for c in range(3)]).flatten()
    assert torch.equal(tokens[0, 1], expected)
    assert torch.equal(unpatchify(tokens, 2, 2), x)


# ---------------------------------------------------------------- forward semantics
@pytest.mark.parametrize("mix", list(MIXES))
def test_every_mix_trains_and_every_parameter_gets_a_gradient(mix):
    torch.manual_seed(0)
    model = tiny(label_drop_prob=0.5, **MIXES[mix]).train()
    size = model.img_size
    loss = model(images(16, size), torch.arange(16) % 4)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


@pytest.mark.parametrize("mix", ["ar_ar", "mar_mar", "mar3_gp"])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(mix):
    torch.manual_seed(0)
    plain = tiny(**MIXES[mix]).train()
    ckpt = tiny(grad_checkpointing=True, **MIXES[mix]).train()
    ckpt.load_state_dict(plain.state_dict())
    x, y = images(4, plain.img_size), torch.arange(4)
    losses, grads = [], []
    for model in (plain, ckpt):
        torch.manual_seed(42)  # same masks, same dropout
        loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_forward_is_deterministic_under_a_seed():
    model = tiny(**MIXES["mar_mar"]).train()
    x, y = images(4, 8), torch.arange(4)
    torch.manual_seed(3)
    a = model(x, y)
    torch.manual_seed(3)
    b = model(x, y)
    assert a.item() == b.item()


def test_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(0)
    model = tiny(**MIXES["mar3_gp"]).eval()
    x, y = images(4, 8), torch.arange(4)
    tables = {0: dict(orders=torch.arange(4).repeat(4, 1), k=4), 1: dict(orders=torch.arange(4).repeat(16, 1), k=4),
              2: dict(orders=torch.arange(4).repeat(64, 1), k=4)}
    with fixed_masking(model, tables), torch.no_grad():
        fp32 = model(x, y).item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x, y)
    assert torch.isfinite(bf16) and bf16.dtype == torch.float32  # logits and loss stay float32
    assert bf16.item() == pytest.approx(fp32, rel=2e-2)


def test_ar_is_causal():
    """Changing patch k changes the conditions of patches after k only."""
    torch.manual_seed(0)
    ar = AR(seq_len=4, patch_size=2, cond_embed_dim=8, embed_dim=16, num_blocks=2, num_heads=2).eval()
    x = images(2, 4)
    cond = [torch.randn(2, 8)]
    with torch.no_grad():
        _, before, _ = ar(x, cond)
        x2 = x.clone()
        x2[:, :, 0:2, 2:4] += 0.5  # patch 1 (top right)
        _, after, _ = ar(x2, cond)
    before, after = before[0].view(2, 4, -1), after[0].view(2, 4, -1)
    torch.testing.assert_close(before[:, :2], after[:, :2])  # conditions for patches 0, 1
    assert (before[:, 2:] - after[:, 2:]).abs().amax() > 1e-4


def test_pixel_head_is_causal_over_channels():
    torch.manual_seed(0)
    head = PixelLoss(c_channels=8, width=16, depth=2, num_heads=2).eval()
    cond = [torch.randn(5, 8)]
    target = torch.zeros(5, 3)
    changed = target.clone()
    changed[:, 1] = 1.5  # green: may change blue's logits only
    with torch.no_grad():
        a, _ = head.predict(target, cond)
        b, _ = head.predict(changed, cond)
    torch.testing.assert_close(a[:, :2], b[:, :2])
    assert (a[:, 2] - b[:, 2]).abs().amax() > 1e-4


def test_mar_masked_patches_are_hidden_and_returned_in_order():
    torch.manual_seed(0)
    mar = MAR(seq_len=4, patch_size=2, cond_embed_dim=8, embed_dim=16, num_blocks=1, num_heads=2,
              num_conds=5).eval()
    x = images(2, 4)
    cond = [torch.randn(2, 8) for _ in range(5)]
    mar.fixed_masking = (torch.tensor([[3, 1, 0, 2], [0, 1, 2, 3]]), 2)  # masks {1,3} and {0,1}
    with torch.no_grad():
        patches, conds, _ = mar(x, cond)
        tokens = patchify(x, 2)
        expected = torch.stack([tokens[0, 1], tokens[0, 3], tokens[1, 0], tokens[1, 1]])
        assert torch.equal(patches.reshape(4, -1), expected)
        x2 = x.clone()
        x2[0, :, 2:4, 2:4] += 5.0  # patch 3 of sample 0 is masked: invisible to the model
        _, conds2, _ = mar(x2, cond)
        torch.testing.assert_close(conds[0], conds2[0])
        x3 = x.clone()
        x3[0, :, 0:2, 0:2] += 5.0  # patch 0 of sample 0 is visible
        _, conds3, _ = mar(x3, cond)
        assert (conds[0][:2] - conds3[0][:2]).abs().amax() > 1e-4


def test_mar_neighbour_conditions():
    mar = MAR(seq_len=4, patch_size=1, cond_embed_dim=4, embed_dim=4, num_blocks=1, num_heads=1)
    x = torch.arange(1, 5, dtype=torch.float32).view(1, 4, 1)  # 2x2 grid [[1, 2], [3, 4]]
    keep, rows = torch.arange(4).view(1, 4), torch.ones(1, 4, dtype=torch.bool)  # every patch
    middle, top, right, bottom, left = (c.flatten().tolist() for c in mar.next_conditions(x, keep, rows))
    assert middle == [1, 2, 3, 4]
    assert top == [0, 0, 1, 2]
    assert right == [2, 0, 4, 0]
    assert bottom == [3, 4, 0, 0]
    assert left == [0, 1, 0, 3]


def test_mar_eval_masks_one_count_for_the_whole_batch():
    mar = MAR(seq_len=16, patch_size=1, cond_embed_dim=4, embed_dim=4, num_blocks=1, num_heads=1).eval()
    torch.manual_seed(0)
    counts = set()
    for _ in range(50):
        mask = mar.choose_mask(6, torch.device("cpu"))
        per_row = mask.sum(1)
        assert (per_row == per_row[0]).all() and 1 <= per_row[0] <= 16
        counts.add(per_row[0].item())
    assert len(counts) > 5
    mar.train()
    rows = torch.cat([mar.choose_mask(64, torch.device("cpu")).sum(1) for _ in range(20)]).float()
    # ratio ~ N(1, 0.25) truncated to [0, 1]: mean about 0.8 of the tokens, varying per row
    assert 0.7 * 16 < rows.mean() < 0.9 * 16 and rows.std() > 1 and rows.min() >= 1


# ---------------------------------------------------------------- sampling semantics
class Recorder:
    """Stands in for the next level: records cfg and rows, returns constant patches."""

    def __init__(self, patch_size):
        self.patch_size = patch_size
        self.calls = []

    def __call__(self, cond_list, cfg, temperature, filter_threshold, known=None, known_mask=None):
        self.calls.append(dict(cfg=cfg, rows=cond_list[0].shape[0], cond=cond_list[0].clone()))
        rows = cond_list[0].shape[0] // 2 if cfg != 1.0 else cond_list[0].shape[0]
        return torch.full((rows, 3, self.patch_size, self.patch_size), 0.5)


def test_ar_sampling_linear_cfg_schedule_and_row_layout():
    ar = AR(seq_len=4, patch_size=2, cond_embed_dim=8, embed_dim=16, num_blocks=1, num_heads=2).eval()
    rec = Recorder(2)
    cond = [torch.randn(6, 8)]  # B = 3, with CFG
    out = ar.sample(cond, 99, 3.0, "linear", 1.0, 0.0, rec)
    assert out.shape == (3, 3, 4, 4)
    assert [c["cfg"] for c in rec.calls] == pytest.approx([1 + 2.0 * (s + 1) / 4 for s in range(4)])
    assert all(c["rows"] == 6 for c in rec.calls)
    rec_const = Recorder(2)
    ar.sample(cond, 99, 3.0, "constant", 1.0, 0.0, rec_const)
    assert [c["cfg"] for c in rec_const.calls] == [3.0] * 4


def test_ar_kv_cache_matches_full_forward():
    """The conditions produced step by step with the cache equal a full causal forward
    over the generated image."""
    torch.manual_seed(0)
    ar = AR(seq_len=4, patch_size=2, cond_embed_dim=8, embed_dim=16, num_blocks=2, num_heads=2).eval()
    cond = [torch.randn(2, 8)]
    calls = []

    def next_level(cond_list, cfg, temperature, filter_threshold):
        calls.append(cond_list[0].clone())
        return torch.randn(cond_list[0].shape[0], 3, 2, 2)

    img = ar.sample(cond, 4, 1.0, "constant", 1.0, 0.0, next_level)
    with torch.no_grad():
        _, full, _ = ar(img, cond)
    torch.testing.assert_close(torch.stack(calls, 1).reshape(8, -1), full[0], rtol=1e-5, atol=1e-5)


def test_mar_sampling_schedule_counts_and_cfg():
    """Cosine schedule: with L=16 and 4 steps, 2, 3, 5 then 6 patches are predicted; linear
    cfg uses the clamped count, so the last step is at 1 + (cfg-1)*(L-1)/L."""
    mar = MAR(seq_len=16, patch_size=1, cond_embed_dim=8, embed_dim=16, num_blocks=1, num_heads=2,
              num_conds=5).eval()
    rec = Recorder(1)
    cond = [torch.randn(4, 8) for _ in range(5)]  # B = 2 with CFG
    mar.sample(cond, 4, 5.0, "linear", 1.0, 0.0, rec)
    assert [c["rows"] for c in rec.calls] == [2 * 2 * n for n in (2, 3, 5, 6)]
    mask_lens = [14, 11, 6, 1]
    assert [c["cfg"] for c in rec.calls] == pytest.approx([1 + 4.0 * (16 - m) / 16 for m in mask_lens])


def test_mar_steps_capped_at_sequence_length():
    mar = MAR(seq_len=4, patch_size=1, cond_embed_dim=8, embed_dim=16, num_blocks=1, num_heads=2).eval()
    rec = Recorder(1)
    mar.sample([torch.randn(2, 8)], 64, 1.0, "constant", 1.0, 0.0, rec)
    assert len(rec.calls) == 4 and sum(c["rows"] for c in rec.calls) == 2 * 4


def test_guided_logits_formula_and_filter():
    cond = torch.tensor([[4.0, 0.0, -20.0]])
    uncond = torch.tensor([[0.0, 2.0, 1.0]])
    torch.testing.assert_close(guided_logits(cond, uncond, 1.0, 0.0), cond)
    torch.testing.assert_close(guided_logits(cond, uncond, 3.0, 0.0), uncond + 3 * (cond - uncond))
    # token 2 has conditional probability < 1e-4: its uncond logit is raised to
    # cond - max(cond) + max(uncond) = -20 - 4 + 2 = -22 -> stays 1.0 (already higher)
    # token 1 (p ~ 0.018) is untouched
    filtered = guided_logits(cond, uncond, 3.0, 1e-4)
    torch.testing.assert_close(filtered, uncond + 3 * (cond - uncond))
    cond2 = torch.tensor([[4.0, -20.0]])
    uncond2 = torch.tensor([[2.0, -30.0]])
    raised = -20.0 - 4.0 + 2.0  # uncond logit of token 1 raised to -22
    expected = torch.tensor([[2.0 + 3 * 2.0, raised + 3 * (-20.0 - raised)]])
    torch.testing.assert_close(guided_logits(cond2, uncond2, 3.0, 1e-4), expected)


def test_pixel_head_cfg_uses_first_half_as_conditional_and_multiplies_temperature():
    torch.manual_seed(0)
    head = PixelLoss(c_channels=8, width=16, depth=1, num_heads=2).eval()
    for p in head.parameters():
        p.data.normal_(0, 1.0)
    cond = torch.randn(3, 8)
    uncond = torch.randn(3, 8)
    cfg, temperature = 2.5, 1e4  # huge temperature multiplies logits: sampling becomes argmax
    out = head.sample([torch.cat([cond, uncond])], temperature, cfg, 0.0)
    with torch.no_grad():
        logits, _ = head.predict(torch.zeros(6, 3), [torch.cat([cond, uncond])])
    red = logits[:, 0]
    expected = (red[3:] + cfg * (red[:3] - red[3:])).argmax(-1)
    assert torch.equal(head.to_pixel_ids(out)[:, 0], expected)


def test_generate_is_reproducible_and_on_the_pixel_grid():
    model = tiny(**MIXES["mar_mar"]).eval()
    torch.manual_seed(0)
    a = model.generate([0, 1, 2], cfg=2.0)
    torch.manual_seed(0)
    b = model.generate([0, 1, 2], cfg=2.0)
    assert a.dtype == torch.uint8 and a.shape == (3, 3, 8, 8)
    assert torch.equal(a, b)
    # sample() returns normalised values exactly on the k/255 grid
    emb = model.class_emb(torch.tensor([0, 1]))
    imgs = model.sample([emb] * 5, (4, 4), 1.0, "constant", 1.0, 0.0, 0)
    raw = (imgs * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
           + torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) * 255
    assert (raw - raw.round()).abs().max() < 1e-3


def test_generate_restores_training_mode():
    model = tiny().train()
    model.generate([0], num_iter_list=(2, 2))
    assert model.training


# ---------------------------------------------------------------- bad input
def test_wrong_image_size_is_rejected():
    model = tiny()
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 8, 8\).*got \(2, 3, 16, 16\)"):
        model(images(2, 16), torch.arange(2))


def test_labels_outside_class_num_are_rejected():
    model = tiny()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        model(images(2, 8), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        model.generate([-1])


def test_num_iter_list_of_the_wrong_length_is_rejected():
    model = tiny()
    with pytest.raises(ValueError, match="one entry per generator level \\(2\\), got \\[4\\]"):
        model.generate([0], num_iter_list=[4])


def test_ar_above_multi_condition_mar_is_rejected():
    with pytest.raises(ValueError, match="MAR level with num_conds=5 cannot sit below an AR level"):
        tiny(generator_type_list=("ar", "mar", "ar"), num_conds=5)


@pytest.mark.parametrize("overrides, message", [
    (dict(embed_dim_list=(32, 16)), "embed_dim_list has 2 entries"),
    (dict(img_size_list=(8, 3, 1)), r"img_size_list\[1\]=3 does not divide img_size_list\[0\]=8"),
    (dict(generator_type_list=("gan", "ar", "ar")), "generator_type_list\\[0\\] 'gan' is not a generator type"),
    (dict(generator_type_list=("ar", "ar", "ar"), num_conds=1, num_heads_list=(16, 2, 2)), "divisible by 4"),
    (dict(guiding_pixel=True, generator_type_list=("mar", "ar", "ar")), "guiding_pixel is only supported by MAR"),
])
def test_bad_configurations_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)
