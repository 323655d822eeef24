"""Your own data: any channel count (grey, RGB, RGBA, ...) through the model, the data
loading, generation, FID and the demos. The default 3 channels are the official
architecture (tests/test_parity.py: numbers and seeded images bit for bit)."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models import FractalGen, UserInputError, create_model
from models.layers import PIXEL_MEAN, PIXEL_STD, pixel_norm
from models.pixelloss import PixelLoss
from util import data as data_util
from util import fid, toy_data
from util.masks import TASKS, make_mask
from util.visualize import load_image, make_grid, show_known, to_pil


def tiny(in_channels, types=("mar", "mar", "ar"), size=8, **kwargs):
    torch.manual_seed(0)
    config = dict(img_size_list=(size, 4, 1), embed_dim_list=(32, 16, 8), num_blocks_list=(1, 1, 1),
                  num_heads_list=(2, 2, 2), generator_type_list=types, class_num=3,
                  num_conds=5 if types[1] == "mar" else 1, in_channels=in_channels)
    config.update(kwargs)
    return FractalGen(**config)


def pixels(batch, channels, size, seed=0):
    return torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the model
def test_parameter_names_follow_the_channels():
    names = {c: [k for k in tiny(c).state_dict() if k.startswith("next_fractal.next_fractal.") and
                 ("codebook" in k or "mlm" in k)] for c in (1, 3, 4)}
    short = {c: sorted(k.split(".")[2] for k in keys) for c, keys in names.items()}
    assert short[3] == ["b_codebook", "b_mlm", "g_codebook", "g_mlm", "r_codebook", "r_mlm"]  # the official names
    assert short[1] == ["l_codebook", "l_mlm"]
    assert short[4] == sorted(short[3] + ["a_codebook", "a_mlm"])
    model = tiny(4, guiding_pixel=True, img_size_list=(8, 4, 2, 1), embed_dim_list=(32, 16, 16, 8),
                 num_blocks_list=(1, 1, 1, 1), num_heads_list=(2, 2, 2, 2), generator_type_list=("mar", "mar", "mar", "ar"))
    assert model.next_fractal.generator.pix_proj.weight.shape == (16, 4)
    assert model.next_fractal.generator.guiding_pixel_loss.in_channels == 4


def test_default_normalisation_per_channel_count():
    assert pixel_norm(3) == (PIXEL_MEAN, PIXEL_STD)
    assert pixel_norm(4) == (PIXEL_MEAN + (0.5,), PIXEL_STD + (0.5,))
    assert pixel_norm(1) == ((0.5,), (0.5,)) and pixel_norm(6) == ((0.5,) * 6, (0.5,) * 6)
    model = tiny(1, pixel_mean=[0.3], pixel_std=[0.2])
    assert model.config["pixel_mean"] == [0.3] and model.config["pixel_std"] == [0.2]
    assert tiny(3).config["pixel_mean"] == list(PIXEL_MEAN)
    for c in (1, 2, 4):  # every value survives the round trip through the normalisation
        values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, c, 16, 16)
        model = tiny(c)
        assert torch.equal(model.to_uint8(model.from_uint8(values)), values)
        head = model.next_fractal.next_fractal
        flat = values.permute(0, 2, 3, 1).reshape(-1, c)
        assert torch.equal(head.to_pixel_ids(model.from_uint8(values).permute(0, 2, 3, 1).reshape(-1, c)), flat.long())


@pytest.mark.parametrize("channels", [1, 4])
def test_the_head_models_the_channels_one_after_another(channels):
    """Causal over channels: the logits of channel c see the values of channels < c only;
    channel 0 sees none (it is predicted from the condition)."""
    torch.manual_seed(0)
    head = PixelLoss(c_channels=8, width=16, depth=2, num_heads=2, r_weight=5.0, in_channels=channels).eval()
    cond = [torch.randn(6, 8)]
    ids = torch.randint(0, 256, (6, channels))
    target = head.from_pixel_ids(ids)
    logits, got = head.predict(target, cond)
    assert torch.equal(got, ids) and logits.shape == (6, channels, 256)
    for c in range(channels):
        changed = ids.clone()
        changed[:, c] = (changed[:, c] + 128) % 256
        other, _ = head.predict(head.from_pixel_ids(changed), cond)
        assert torch.equal(other[:, :c + 1], logits[:, :c + 1])  # channel c and earlier: unchanged
        if c + 1 < channels:
            assert not torch.allclose(other[:, c + 1:], logits[:, c + 1:])  # later ones see it


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_r_weight_weighs_channel_zero_in_training_only(channels):
    torch.manual_seed(0)
    head = PixelLoss(c_channels=8, width=16, depth=1, num_heads=2, r_weight=5.0, in_channels=channels)
    cond = [torch.randn(10, 8)]
    target = head.from_pixel_ids(torch.randint(0, 256, (10, channels)))
    torch.manual_seed(1)
    logits, ids = head.predict(target, cond)
    ce = torch.stack([F.cross_entropy(logits[:, c], ids[:, c], reduction="none") for c in range(channels)], 1)
    weights = torch.tensor([5.0] + [1.0] * (channels - 1))
    torch.manual_seed(1)
    train = head.train()(target, cond)
    torch.testing.assert_close(train, ((ce * weights).sum(1) / weights.sum()).mean())
    torch.manual_seed(1)
    torch.testing.assert_close(head.eval()(target, cond), ce.mean())


@pytest.mark.parametrize("channels", [1, 2, 4, 5])
def test_every_channel_count_trains_samples_and_completes(channels, one_thread):
    model = tiny(channels)
    x = model.from_uint8(pixels(4, channels, 8))
    loss = model.train()(x, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    torch.manual_seed(0)
    out = model.generate([0, 1], num_iter_list=(2, 2), cfg=2.0)
    assert out.shape == (2, channels, 8, 8) and out.dtype == torch.uint8
    known = pixels(1, channels, 8, seed=3)
    for task in TASKS:  # the four conditional tasks keep the known pixels, every channel
        mask = make_mask(task, 8)
        done = model.generate([1, 2], known=known, known_mask=mask, num_iter_list=(2, 2), cfg=2.0)
        assert torch.equal(done[:, :, mask[0, 0]], known.expand(2, -1, -1, -1)[:, :, mask[0, 0]])
    with pytest.raises(ValueError, match=rf"expected images of shape \(B, {channels}, 8, 8\)"):
        model(torch.zeros(1, 3 if channels != 3 else 1, 8, 8), torch.tensor([0]))


@pytest.mark.parametrize("channels", [1, 4])
def test_fast_sampler_draws_what_the_official_path_draws(channels, one_thread):
    """With temperature 1e3 every draw is the argmax, so the static-shape steps (fused pixel
    draw + AR decode step) and the official path give the same pixels (up to near ties)."""
    model = tiny(channels, types=("ar", "ar", "ar")).eval()
    with torch.no_grad():
        for mlm in model.next_fractal.next_fractal.heads():
            mlm.bias.copy_(torch.randn(1, 256) * 4)
    sharp = dict(num_iter_list=(4, 4), cfg=1.0, temperature=1e3)
    exact = model.generate([0, 1, 2], **sharp)
    fast = model.generate([0, 1, 2], fast="eager", **sharp)
    assert (exact == fast).float().mean() > 0.95


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_fast_pixel_draws_feed_every_channel_back(channels, one_thread):
    """The head's fixed-shape draw (`draw_pixels`) against its cached official path, at
    temperature 1e3 (argmax draws); the codebooks are scaled up so that each channel's
    draw depends strongly on the channels fed back before it."""
    torch.manual_seed(0)
    head = PixelLoss(c_channels=8, width=16, depth=2, num_heads=2, in_channels=channels).eval()
    with torch.no_grad():
        for codebook in head.codebooks():
            codebook.weight.mul_(50)
    cond = [torch.randn(64, 8)]
    exact = head.to_pixel_ids(head.sample(cond, temperature=1e3, cfg=1.0))
    fast = head.to_pixel_ids(head.sample(cond, temperature=1e3, cfg=1.0, fast="eager"))
    assert ((exact == fast).float().mean(0) > 0.9).all()


def test_nll_is_the_mean_over_every_channel():
    model = tiny(4).eval()
    x = model.from_uint8(pixels(2, 4, 8))
    head = model.next_fractal.next_fractal
    seen = []
    original = head.forward
    head.forward = lambda target, cond: seen.append(target.shape) or original(target, cond)
    torch.manual_seed(0)
    loss = model(x, torch.tensor([0, 1]))
    assert seen and all(s[1] == 4 for s in seen) and 0 < loss.item() / np.log(2) < 9


@pytest.mark.parametrize("record, message", [
    (dict(in_channels=0), r"in_channels must be at least 1, got 0"),
    (dict(in_channels="4"), r"in_channels must be a whole number, got '4'"),
    (dict(in_channels=4, pixel_mean=[0.5]), r"pixel_mean has 1 entries but in_channels is 4"),
    (dict(in_channels=1, pixel_std=[0.0]), r"pixel_std must be above 0"),
    (dict(in_channels=1, pixel_mean=["a"]), r"pixel_mean\[0\] must be a finite number"),
])
def test_bad_channel_settings_are_one_sentence(record, message, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(dict(img_size_list=[8, 4, 1], embed_dim_list=[32, 16, 8], num_blocks_list=[1, 1, 1],
                                    num_heads_list=[2, 2, 2], generator_type_list=["mar", "mar", "ar"], **record)))
    with pytest.raises(UserInputError, match=message):
        create_model(str(path))


# ---------------------------------------------------------------- data, images, FID
def write_folder(root, mode, size=12, count=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = {"L": (size, size), "LA": (size, size, 2), "RGB": (size, size, 3), "RGBA": (size, size, 4)}[mode]
    for c in ("a", "b"):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(os.path.join(root, c, f"{i}.png"))


@pytest.mark.parametrize("stored, channels, note", [
    ("RGB", 1, "RGB; they are read as L for this 1-channel model: colour becomes grey"),
    ("L", 3, "L; they are read as RGB for this 3-channel model: grey is copied to R, G and B"),
    ("RGB", 4, "RGB; they are read as RGBA for this 4-channel model: alpha is added, fully opaque"),
    ("RGBA", 3, "RGBA; they are read as RGB for this 3-channel model: alpha is dropped"),
    ("RGBA", 4, None),
])
def test_data_is_read_with_the_model_s_channels_saying_once_what_changes(stored, channels, note, tmp_path, capsys):
    write_folder(tmp_path / "train", stored)
    mean, std = pixel_norm(channels)
    dataset = data_util.build_dataset(str(tmp_path), "train", 8, False, channels=channels, mean=mean, std=std)
    out = capsys.readouterr().out
    assert (note in out and out.count("\n") == 1) if note else out == ""
    image, _ = dataset[0]
    assert image.shape == (channels, 8, 8)
    raw = Image.open(dataset.samples[0][0])
    if stored == "RGBA" and channels == 4:  # alpha survives: the tensor holds the file's values exactly
        expected = torch.from_numpy(np.array(data_util.center_crop_arr(raw, 8))).permute(2, 0, 1)
        torch.testing.assert_close(image, (expected.float() / 255 - torch.tensor(mean).view(-1, 1, 1))
                                   / torch.tensor(std).view(-1, 1, 1))


def test_more_than_four_channels_have_no_image_files(tmp_path):
    write_folder(tmp_path / "train", "RGB")
    with pytest.raises(UserInputError, match="with 5 channels has no image file mode"):
        data_util.build_dataset(str(tmp_path), "train", 8, False, channels=5, mean=(0.5,) * 5, std=(0.5,) * 5)


def test_entry_points_refuse_five_channels_before_writing(run_main, tmp_path):
    write_folder(tmp_path / "data" / "train", "RGB")
    cfg = tmp_path / "five.json"
    cfg.write_text(json.dumps(dict(channel_record(5), class_num=2)))
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="error: a model with 5 channels has no image file mode"):
        run_main("--model", cfg, "--data_path", tmp_path / "data", "--output_dir", out, "--device", "cpu")
    assert not out.exists()
    from demo import sample
    path = tmp_path / "checkpoint-last.pth"
    model = create_model(str(cfg))
    torch.save({"model": model.state_dict(), "config": model.config}, path)
    with pytest.raises(SystemExit, match="error: this model with 5 channels has no image file mode"):
        sample.main(["--ckpt", str(path), "--output", str(out / "x.png"), "--device", "cpu"])
    assert not out.exists()


@pytest.mark.parametrize("channels, mode", [(1, "L"), (2, "LA"), (3, "RGB"), (4, "RGBA")])
def test_images_are_written_in_the_mode_of_their_channels(channels, mode, tmp_path):
    images = pixels(3, channels, 6)
    pil = to_pil(images[0])
    assert pil.mode == mode
    path = tmp_path / "x.png"
    pil.save(path)
    back = load_image(str(path), 6, channels)
    assert torch.equal(back, images[:1])  # lossless, alpha included
    grid = make_grid(images, nrow=2)
    assert grid.shape[0] == channels and to_pil(grid).mode == mode
    shown = show_known(images[:1], make_mask("inpaint", 6))
    if channels in (2, 4):
        assert (shown[0, -1] == 255).sum() >= (~make_mask("inpaint", 6)).sum()  # the checkerboard is opaque


def test_inception_sees_grey_replicated_and_alpha_over_white(tmp_path):
    grey = pixels(2, 1, 4)
    assert torch.equal(fid.inception_rgb(grey), grey.expand(-1, 3, -1, -1))
    rgba = torch.tensor([[[[200]], [[10]], [[0]], [[0]]], [[[200]], [[10]], [[0]], [[255]]],
                         [[[200]], [[10]], [[0]], [[128]]]], dtype=torch.uint8)  # (3, 4, 1, 1)
    rgb = fid.inception_rgb(rgba)[:, :, 0, 0]
    assert rgb.tolist() == [[255, 255, 255], [200, 10, 0], [227, 132, 127]]  # round(c a / 255 + 255 (1 - a / 255))
    rgb3 = pixels(2, 3, 4)
    assert fid.inception_rgb(rgb3) is rgb3
    with pytest.raises(UserInputError, match="5-channel images have no RGB view"):
        fid.inception_rgb(pixels(1, 5, 4))
    # a generated RGBA image written as PNG and read back as a reference file: what Inception sees is the same
    image = pixels(1, 4, 8)
    to_pil(image[0]).save(tmp_path / "g.png")
    assert torch.equal(fid.ImageFiles([str(tmp_path / "g.png")])[0], fid.inception_rgb(image)[0])


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_toy_data_writes_grey_and_rgba_variants(mode, tmp_path):
    root = toy_data.make_dataset(str(tmp_path / mode), num_classes=2, num_train_per_class=3, num_val_per_class=1,
                                 size=12, mode=mode)
    files = sorted(p for p in (tmp_path / mode / "train").rglob("*.png"))
    images = [Image.open(p) for p in files]
    assert len(files) == 6 and {im.mode for im in images} == {mode}
    if mode == "RGBA":
        alphas = np.concatenate([np.asarray(im)[..., 3].ravel() for im in images])
        assert set(np.unique(alphas)) <= {0, *toy_data.SHAPE_ALPHAS} and 0 in alphas and (alphas > 0).any()
    rgb = toy_data.make_dataset(str(tmp_path / "rgb"), num_classes=2, num_train_per_class=3, num_val_per_class=1,
                                size=12)
    assert json.load(open(os.path.join(rgb, toy_data.CONFIG_FILE))).get("mode") is None
    assert root == str(tmp_path / mode)


# ---------------------------------------------------------------- end to end
def channel_record(channels):
    return dict(img_size_list=[16, 4, 1], embed_dim_list=[64, 32, 16], num_blocks_list=[2, 1, 1],
                num_heads_list=[4, 2, 2], generator_type_list=["mar", "mar", "ar"], num_conds=5,
                in_channels=channels, sampling=dict(num_iter_list=[16, 8], cfg=2.0, temperature=2.0))


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_a_grey_or_rgba_folder_trains_resumes_evaluates_samples_and_reloads(mode, run_main, tmp_path, capsys,
                                                                              fid_stats, inception_weights):
    """Toy shapes as greyscale or RGBA PNGs (transparent background): a JSON model with 1 or
    4 channels trains, resumes from its checkpoint alone, evaluates bits/dim, generates PNGs
    of the same mode (FID on their RGB view), completes a partly known input keeping its
    alpha, and reloads with models.load_model."""
    from demo import sample
    from models import load_model
    channels = {"L": 1, "RGBA": 4}[mode]
    data = toy_data.make_dataset(str(tmp_path / "data"), num_classes=2, num_train_per_class=16,
                                 num_val_per_class=4, size=16, mode=mode)
    cfg = tmp_path / f"shapes_{mode.lower()}.json"
    cfg.write_text(json.dumps(channel_record(channels)))
    out = tmp_path / "run"
    common = ["--data_path", data, "--output_dir", out, "--device", "cpu", "--batch_size", 8, "--warmup_epochs", 1,
              "--num_workers", 0, "--lr", "1e-2", "--lr_schedule", "constant"]
    run_main("--model", cfg, "--epochs", 4, *common)
    assert f"they are read as {mode}" not in capsys.readouterr().out  # the files are already in that mode
    os.remove(cfg)
    resumed = run_main("--resume", out, "--epochs", 8, *common)["model"]
    assert resumed.in_channels == channels and resumed.config["in_channels"] == channels

    nll = run_main("--resume", out, "--evaluate_nll", "--nll_bsz", 8, *common)["nll"]
    assert nll["images"] == 8 and 0 < nll["bpd"] < 4  # 8: a uniform guess

    gen = run_main("--resume", out, "--evaluate_gen", "--num_images", 4, "--gen_bsz", 4, "--fid_stats_path",
                   fid_stats, "--inception_weights", inception_weights, "--cfg", 2.0, "--temperature", 2.0, *common)
    assert "RGBA composited over white" in capsys.readouterr().out if mode == "RGBA" else True
    written = sorted(os.listdir(gen["gen"]["folder"]))
    assert len(written) == 4 and {Image.open(os.path.join(gen["gen"]["folder"], f)).mode for f in written} == {mode}
    assert np.isfinite(gen["gen"]["fid"])

    val_image = sorted((tmp_path / "data" / "val").rglob("*.png"))[0]
    grid = tmp_path / "inpaint.png"
    sample.main(["--ckpt", str(out), "--task", "inpaint", "--input", str(val_image), "--labels", "0",
                 "--num_per_label", "2", "--output", str(grid), "--scale", "1", "--device", "cpu"])
    shown = np.asarray(Image.open(grid))
    assert Image.open(grid).mode == mode
    source = np.asarray(Image.open(val_image))
    known = make_mask("inpaint", 16)[0, 0].numpy()
    for tile in (2, 3):  # the two completions keep the known pixels, alpha included
        x = 2 + (tile - 1) * 18
        assert np.array_equal(shown[2:18, x:x + 16][known], source[known])

    model = load_model(str(out))
    assert model.config == resumed.config and model.model_name == f"shapes_{mode.lower()}"
    torch.manual_seed(0)
    images = model.generate([0, 1, 0, 1])
    assert images.shape == (4, channels, 16, 16)
    if mode == "RGBA":  # real transparency: the transparent background is generated as such
        alpha = images[:, 3]
        assert (alpha == 0).float().mean() > 0.5 and (alpha >= min(toy_data.SHAPE_ALPHAS)).any()
    # last: a capsys.readouterr() after it would swallow it (shown with -s)
    print(f"\nbits/dim toy shapes {mode} ({channels} channel(s), 8 epochs of 4 steps): {nll['bpd']:.4f}")


@pytest.mark.parametrize("types", [("ar", "ar", "ar"), ("mar", "mar", "ar")], ids=["ar", "mar"])
@pytest.mark.parametrize("fast", [False, "eager"])
@pytest.mark.parametrize("channels", [1, 2, 4])
def test_every_channel_lands_in_its_own_plane(channels, fast, types, one_thread):
    """A head that always draws the value 10 + 40 c for channel c (a one-hot bias outweighs
    everything else): every level, official and fast paths, must put channel c's draws
    into plane c at every pixel (a channel/pixel layout mix-up anywhere moves some)."""
    model = tiny(channels, types=types, guiding_pixel=types[1] == "mar").eval()
    values = [10 + 40 * c for c in range(channels)]
    with torch.no_grad():
        for mlm, value in zip(model.next_fractal.next_fractal.heads(), values):
            mlm.bias.fill_(-1e4)
            mlm.bias[0, value] = 1e4
    torch.manual_seed(0)
    out = model.generate([0, 1], num_iter_list=(2, 2), cfg=2.0, fast=fast)
    expected = torch.tensor(values, dtype=torch.uint8).view(1, channels, 1, 1).expand(2, -1, 8, 8)
    assert torch.equal(out, expected)


def test_an_unlabelled_grey_folder_with_ema_and_three_generator_levels(run_main, tmp_path, capsys):
    """The pieces compose: 128 -> 16 -> 4 -> 1 (MAR over AR over MAR, a structure no named
    model has) with one channel, trained with --ema_rate on an unlabelled greyscale folder;
    resumed from its checkpoint alone, bits/dim of its EMA weights, sampled and reloaded."""
    from demo import sample
    from models import load_model
    from util.checkpoint import load_checkpoint
    data = toy_data.make_dataset(str(tmp_path / "data"), num_classes=2, num_train_per_class=4, num_val_per_class=2,
                                 size=128, mode="L", unlabelled=True)
    cfg = tmp_path / "grey128.json"
    cfg.write_text(json.dumps(dict(
        img_size_list=[128, 16, 4, 1], embed_dim_list=[32, 16, 16, 8], num_blocks_list=[1, 1, 1, 1],
        num_heads_list=[2, 2, 2, 2], generator_type_list=["mar", "ar", "mar", "ar"], num_conds=1, in_channels=1,
        sampling=dict(num_iter_list=[2, 16, 2]))))
    out = tmp_path / "run"
    common = ["--data_path", data, "--output_dir", out, "--device", "cpu", "--batch_size", 4, "--warmup_epochs", 1,
              "--num_workers", 0, "--lr", "1e-2", "--lr_schedule", "constant", "--ema_rate", 0.9]
    run_main("--model", cfg, "--epochs", 2, *common)
    text = capsys.readouterr().out
    assert "holds 8 images without class folders: one class" in text and "they are read as" not in text
    os.remove(cfg)
    resumed = run_main("--resume", out, "--epochs", 3, *common)["model"]
    ckpt = load_checkpoint(str(out / "checkpoint-last.pth"))
    assert ckpt["epoch"] == 2 and ckpt["config"]["in_channels"] == 1 and ckpt["config"]["class_num"] == 1
    assert ckpt["model_ema"]["next_fractal.next_fractal.next_fractal.l_codebook.weight"].shape == (256, 8)
    assert not all(torch.equal(v, ckpt["model"][k]) for k, v in ckpt["model_ema"].items())
    assert resumed.config == ckpt["config"]

    result = run_main("--resume", out, "--evaluate_nll", "--nll_bsz", 4, *common)
    assert result["model"].weights == "ema" and "evaluating the EMA weights" in capsys.readouterr().out
    nll = result["nll"]
    assert nll["images"] == 4 and 0 < nll["bpd"] < 8
    print(f"\nbits/dim grey unlabelled 128-16-4-1 mar/ar/mar, EMA weights, 3 epochs of 2 steps: {nll['bpd']:.4f}")

    model = load_model(str(out))
    assert model.weights == "ema" and model.class_num == 1 and model.sampling_config()["cfg"] == 1.0
    assert all(torch.equal(v, ckpt["model_ema"][k]) for k, v in model.state_dict().items())
    torch.manual_seed(0)
    assert model.generate([0]).shape == (1, 1, 128, 128)
    png = tmp_path / "grey.png"
    sample.main(["--ckpt", str(out), "--output", str(png), "--scale", "1", "--device", "cpu"])
    assert Image.open(png).mode == "L" and Image.open(png).size == (128 + 4, 128 + 4)
