"""Conditional pixel prediction: inpainting, outpainting, uncropping, editing."""
import pytest
import torch

from models import FractalGen, PixelLoss

MIXES = {
    "ar": dict(generator_type_list=("ar", "ar", "ar"), num_conds=1),
    "mar": dict(generator_type_list=("mar", "mar", "ar"), num_conds=5),
    "mar_gp": dict(img_size_list=(16, 4, 2, 1), embed_dim_list=(32, 16, 16, 8), num_blocks_list=(1, 1, 1, 1),
                   num_heads_list=(2, 2, 2, 2), generator_type_list=("mar", "mar", "mar", "ar"),
                   num_conds=5, guiding_pixel=True),
}


def tiny(mix):
    torch.manual_seed(0)
    config = dict(img_size_list=(16, 4, 1), embed_dim_list=(32, 16, 8), num_blocks_list=(1, 1, 1),
                  num_heads_list=(2, 2, 2), class_num=4)
    config.update(MIXES[mix])
    return FractalGen(**config).eval()


def masks(size=16):
    """Inpainting (centre unknown) and an irregular mask that cuts through patches."""
    inpaint = torch.ones(1, 1, size, size, dtype=torch.bool)
    inpaint[..., 4:12, 4:12] = False
    irregular = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(1)) > 0.5
    return {"inpaint": inpaint, "irregular": irregular}


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("mask_name", ["inpaint", "irregular"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_known_pixels_are_kept_exactly_and_the_rest_is_generated(mix, mask_name, cfg):
    model = tiny(mix)
    known = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    mask = masks()[mask_name]
    torch.manual_seed(0)
    out = model.generate([0, 1, 2], cfg=cfg, known=known, known_mask=mask)
    keep = mask.expand_as(known)
    assert torch.equal(out[keep], known[keep])
    # unknown pixels are drawn by the model, not copied
    assert (out[~keep] != known[~keep]).float().mean() > 0.9


def test_known_channels_are_taken_at_the_pixel_head():
    """Only the green channel is known everywhere: green is kept, red and blue drawn."""
    model = tiny("mar")
    known = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 3, 1, 1, dtype=torch.bool)
    mask[:, 1] = True
    out = model.generate([0, 1], known=known, known_mask=mask)
    assert torch.equal(out[:, 1], known[:, 1])
    assert (out[:, 0] != known[:, 0]).float().mean() > 0.9


def test_fully_known_patches_are_not_sampled():
    """With the left half known, the top level only calls the next level for the patches
    of the right half."""
    model = tiny("ar")
    known = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    mask = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    mask[..., :, :8] = True
    rows = []
    original = model.next_fractal.sample

    def counting(*args, **kwargs):
        rows.append(kwargs["cond_list"][0].shape[0])
        return original(*args, **kwargs)

    model.next_fractal.sample = counting
    model.generate([0], known=known, known_mask=mask)
    assert len(rows) == 8  # 16 patches, 8 of them known


def test_known_pixels_condition_the_generation():
    """Same seed, different known content -> different generated pixels elsewhere."""
    model = tiny("mar")
    with torch.no_grad():  # a random model with larger weights, so conditions matter
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    mask = masks()["inpaint"]
    outs = []
    for value in (0, 255):
        torch.manual_seed(0)
        outs.append(model.generate([0], known=torch.full((1, 3, 16, 16), value, dtype=torch.uint8), known_mask=mask))
    hole = ~mask.expand(1, 3, 16, 16)
    assert not torch.equal(outs[0][hole], outs[1][hole])


def test_pixel_head_known_channels():
    head = PixelLoss(c_channels=8, width=16, depth=1, num_heads=2).eval()
    known = head.from_pixel_ids(torch.tensor([[10, 20, 30], [40, 50, 60]]))
    mask = torch.tensor([[True, False, True], [False, False, False]])
    out = head.to_pixel_ids(head.sample([torch.randn(2, 8)], 1.0, 1.0, 0.0, known=known, known_mask=mask))
    assert out[0, 0] == 10 and out[0, 2] == 30


@pytest.mark.parametrize("kwargs, message", [
    (dict(known=torch.zeros(1, 3, 8, 8, dtype=torch.uint8), known_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool)),
     r"known must be images of shape \(1, 3, 16, 16\) or \(16, 16, 3\), got \(1, 3, 8, 8\)"),
    (dict(known=torch.zeros(1, 3, 16, 16), known_mask=torch.ones(1, 1, 16, 16, dtype=torch.bool)),
     "known must be a uint8 image"),
    (dict(known=torch.zeros(1, 3, 16, 16, dtype=torch.uint8)), "known_mask is required"),
    (dict(known=torch.zeros(1, 3, 16, 16, dtype=torch.uint8), known_mask=torch.ones(2, 8, dtype=torch.bool)),
     "does not broadcast"),
])
def test_bad_known_inputs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny("ar").generate([0], **kwargs)
