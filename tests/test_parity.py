"""Golden-case parity with the official implementation (fixtures made by the official code).

Each fixture holds a config, a state_dict, an input batch and the official eval-mode
losses; see tests/fixtures/README.md.
"""
import math

import pytest
import torch

from golden import FIXTURES, load_case
from models import FractalGen, fixed_masking, to_uint8

CASES = ["case_ar", "case_mar", "case_mar_gp"]
MAR_CASES = ["case_mar", "case_mar_gp"]
REL_TOL = 1e-5


def rel_err(a, b):
    return abs(a - b) / abs(b)


def build(case):
    model = FractalGen(**case["config"])
    # case_mar_gp stores float16 values that are exactly the float32 weights used
    model.load_state_dict({k: v.float() for k, v in case["model"].items()}, strict=True)
    return model.eval()


@pytest.mark.parametrize("name", CASES)
def test_state_dict_loads_strictly_and_counts_match(name):
    case = load_case(name)
    model = build(case)
    assert sum(p.numel() for p in model.parameters()) == case["num_params"]
    assert list(model.state_dict()) == list(case["model"])  # same names, same order


def test_ar_eval_loss_matches_per_batch_and_per_image():
    case = load_case("case_ar")
    model = build(case)
    with torch.no_grad():
        loss = model(case["images"], case["labels"]).item()
        assert rel_err(loss, case["eval_loss"]) < REL_TOL
        for i, expected in enumerate(case["eval_loss_per_image"]):
            got = model(case["images"][i:i + 1], case["labels"][i:i + 1]).item()
            assert rel_err(got, expected) < REL_TOL, f"image {i}"
        # eval is unconditional: other labels give the same loss
        assert model(case["images"], (case["labels"] + 1) % 10).item() == loss


@pytest.mark.parametrize("name", MAR_CASES)
def test_mar_fixed_mask_losses_match_exactly(name):
    case = load_case(name)
    model = build(case)
    for variant in case["eval_loss_fixed_mask"]:
        with fixed_masking(model, case["fixed_mask_orders"][variant["name"]]), torch.no_grad():
            got = model(case["images"], case["labels"]).item()
        assert rel_err(got, variant["value"]) < REL_TOL, variant["name"]


def test_mar_fixed_mask_activations_match():
    """Level by level: what each MAR level hands to the next (first rows)."""
    case = load_case("case_mar")
    model = build(case)
    acts = case["activations"]
    with fixed_masking(model, case["fixed_mask_orders"]["random_orders_k"]), torch.no_grad():
        cond = [model.class_condition(case["labels"])] * 5
        patches, conds, _ = model.generator(case["images"], cond)
        n = acts["L0.patches_next"].shape[0]
        torch.testing.assert_close(patches[:n], acts["L0.patches_next"], atol=1e-5, rtol=1e-5)
        for i in range(5):
            torch.testing.assert_close(conds[i][:n], acts[f"L0.cond_next[{i}]"], atol=1e-5, rtol=1e-5)
        patches, conds, _ = model.next_fractal.generator(patches, conds)
        torch.testing.assert_close(patches[:n], acts["L1.patches_next"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(conds[0][:n], acts["L1.cond_next[0]"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_train_loss_and_gradients_match_without_dropout(name):
    """Train mode, dropout and label dropout off, fixed masks: checks the class-embedding
    path, the r_weight weighting and the backward pass."""
    case = load_case(name)
    model = build(case).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.label_drop_prob = 0.0
    reference = case["train_loss_fixed_nodrop"]
    tables = case["fixed_mask_orders"]["random_orders_k"] if "fixed_mask_orders" in case else {}
    with fixed_masking(model, tables):
        loss = model(case["images"], case["labels"])
    loss.backward()
    assert rel_err(loss.item(), reference["value"]) < REL_TOL
    grads = {n: p.grad for n, p in model.named_parameters()}
    for pname, expected in reference["grad_norms"].items():
        got = grads[pname].norm().item() if grads[pname] is not None else 0.0
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-8), pname


@pytest.mark.parametrize("name", MAR_CASES)
def test_mar_random_mask_mean_within_four_standard_errors(name):
    case = load_case(name)
    model = build(case)
    torch.manual_seed(1234)
    n = 200
    with torch.no_grad():
        values = torch.tensor([model(case["images"], case["labels"]).item() for _ in range(n)],
                              dtype=torch.float64)
    mean, se = values.mean().item(), (values.std() / math.sqrt(n)).item()
    ref_mean, ref_se = case["eval_loss_mc_mean"], case["eval_loss_mc_se"]
    assert abs(mean - ref_mean) < 4 * math.sqrt(se ** 2 + ref_se ** 2), (mean, ref_mean, se, ref_se)
    # the masks really are random: the loss varies between forwards
    assert values.std().item() > 0


# ---------------------------------------------------------------- seeded sampling
OFFICIAL_SAMPLES = torch.load(FIXTURES / "official_samples.pth", weights_only=True)["entries"]


def sample_id(entry):
    s = entry["settings"]
    return f"{entry['case']}-cfg{s['cfg']}{s['cfg_schedule']}-iters{'x'.join(map(str, s['num_iter_list']))}"


@pytest.mark.parametrize("entry", OFFICIAL_SAMPLES, ids=sample_id)
def test_seeded_sampling_reproduces_the_official_images(entry):
    """With the same seed, weights and settings, our sampler draws the same random numbers in
    the same order as the official one (MAR orders, guiding pixels, every pixel's
    categorical draw) and returns the very same images: any optimisation that changes a
    sampled value, or the random stream, fails here."""
    model = build(load_case(entry["case"]))
    settings = dict(entry["settings"], num_iter_list=tuple(entry["settings"]["num_iter_list"]))
    torch.manual_seed(entry["seed"])
    images = model.generate(entry["labels"], **settings)
    assert torch.equal(images, entry["images_uint8"])

    # the official API with an official-style condition list gives the same images
    labels = torch.tensor(entry["labels"])
    torch.manual_seed(entry["seed"])
    with torch.no_grad():
        emb = model.class_emb(labels)
        if settings["cfg"] != 1.0:
            emb = torch.cat([emb, model.fake_latent.repeat(len(labels), 1)])
        normalised = model.sample([emb] * 5, fractal_level=0, **settings)
    assert torch.equal(to_uint8(normalised), entry["images_uint8"])
