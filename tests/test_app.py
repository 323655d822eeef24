"""demo/app.py without a browser: uploads, painted masks, the sampling worker, the page's
wiring. tests/test_app_browser.py drives the same page in Chromium."""
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from demo import app
from models import create_model
from util.masks import make_mask
from util.misc import UserInputError
from util.visualize import make_grid

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per test


@pytest.fixture(scope="module")
def ckpt(imagenet_tiny_ckpt):
    """Random fractalar_tiny weights with the 1,000 ImageNet classes (names on the page)."""
    return imagenet_tiny_ckpt


@pytest.fixture(scope="module")
def store(ckpt):
    return app.ModelStore([ckpt], torch.device("cpu"))


def save(tmp_path, name, array):
    path = tmp_path / name
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return str(path)


def picture(seed=0, size=16):
    """Reddish pixels (never grey like the checkerboard of unknown pixels)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(200, 256, (size, size)), rng.integers(0, 60, (size, size)),
                     rng.integers(0, 256, (size, size))], -1).astype(np.uint8)


def as_tensor(pil):
    return torch.from_numpy(np.asarray(pil.convert("RGB")).copy()).permute(2, 0, 1)


def test_classes_by_name_come_from_torchvision_offline(store, ckpt):
    model = store.get(ckpt)
    names = app.class_choices(model)
    assert len(names) == 1000 and names[207] == "207: golden retriever" and names[974] == "974: geyser"
    assert app.parse_class(names[207], model) == 207 and app.parse_class("360", model) == 360
    for bad in ("dog", "1000", "-1"):
        with pytest.raises(UserInputError, match="pick one from the list"):
            app.parse_class(bad, model)
    small = create_model("fractalar_tiny", class_num=3)
    assert app.class_choices(small) == ["0", "1", "2"]


def test_uploads_are_checked_before_decoding_with_one_line(tmp_path):
    good = save(tmp_path, "good.png", np.zeros((20, 24, 3)))
    assert app.read_upload(good, 16).shape == (1, 3, 16, 16)
    (tmp_path / "notes.png").write_text("not a picture")
    cases = {
        str(tmp_path / "notes.png"): "notes.png is not a picture this demo can read",
        save(tmp_path, "small.png", np.zeros((8, 8, 3))): "smaller than the model's 16x16",
        save(tmp_path, "long.png", np.zeros((16, 48, 3))): "crop it closer to a square",
        None: "upload a picture first",
    }
    huge = tmp_path / "huge.png"
    Image.new("RGB", (app.MAX_UPLOAD_SIDE + 1, 16)).save(huge)
    cases[str(huge)] = f"at most {app.MAX_UPLOAD_SIDE} pixels"
    big_file = tmp_path / "big.png"
    with open(big_file, "wb") as f:
        f.truncate((app.MAX_UPLOAD_MB + 1) * 2**20)
    cases[str(big_file)] = f"upload a picture under {app.MAX_UPLOAD_MB} MB"
    truncated = tmp_path / "cut.png"
    Image.fromarray(picture(size=64)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    cases[str(truncated)] = "cut.png cannot be decoded"
    for path, message in cases.items():
        with pytest.raises(UserInputError, match=message) as e:
            app.read_upload(path, 16)
        assert "\n" not in str(e.value)


def test_painted_layers_become_the_unknown_region():
    size, scale = 16, 16
    layer = np.zeros((size * scale, size * scale, 4), dtype=np.uint8)
    layer[5 * scale + 3:5 * scale + 5, 7 * scale:9 * scale + 1, 3] = 255   # touches pixels (5, 7..9)
    layer[12 * scale:13 * scale, 0:scale, 3] = app.PAINT_ALPHA - 1          # too faint: ignored
    known = app.painted_mask({"background": None, "layers": [layer], "composite": None}, size)
    expected = torch.ones(1, 1, size, size, dtype=torch.bool)
    expected[..., 5, 7:10] = False
    assert torch.equal(known, expected)
    with pytest.raises(UserInputError, match="nothing is painted"):
        app.painted_mask({"layers": [np.zeros_like(layer)]}, size)
    # a preset replaces the painting
    assert torch.equal(app.known_mask_for("uncrop", None, size, 0.25, "left"), make_mask("uncrop", size, 0.25, "left"))


def test_sample_job_is_generate_with_the_seed(store, ckpt):
    """The page's samples are the CLI's: the same generate(), seeded the same way."""
    model = store.get(ckpt)
    seen = []
    updates = list(app.sample_job(store, ckpt, ["207: golden retriever", "3"], 2, 1.5, 1.2, "4,2", 7,
                                  progress=lambda value, **kw: seen.append(value)))
    final, status = updates[-1]
    assert status.startswith("done in") and "cfg 1.5, temperature 1.2, iterations 4,2, seed 7" in status
    torch.manual_seed(7)
    expected = model.generate([207, 207, 3, 3], cfg=1.5, temperature=1.2, num_iter_list=(4, 2))
    assert torch.equal(as_tensor(final), make_grid(expected, nrow=2))
    steps = [s for _, s in updates[:-1]]  # AR: one top-level step per patch, whatever the iterations
    assert steps == [f"step {i}/16: 4 image(s) with cfg 1.5, temperature 1.2, iterations 4,2, seed 7" for i in
                     range(1, 17)] and seen == [(i, 16) for i in range(1, 17)]


def test_complete_job_keeps_the_known_pixels(store, ckpt, tmp_path):
    model = store.get(ckpt)
    upload = save(tmp_path, "in.png", picture())
    layer = np.zeros((256, 256, 4), dtype=np.uint8)
    layer[100:160, 40:200, 3] = 255
    updates = list(app.complete_job(store, ckpt, upload, {"layers": [layer]}, app.PAINTED, 0.5, "right",
                                    "360: otter", None, None, "", 3))
    shown, out, status = updates[-1]
    assert status.startswith("done in") and out.size == (16, 16) and shown.size == (16, 16)
    known = app.painted_mask({"layers": [layer]}, 16)
    original = torch.from_numpy(picture()).permute(2, 0, 1)
    completed = as_tensor(out)
    assert torch.equal(completed[:, known[0, 0]], original[:, known[0, 0]])
    torch.manual_seed(3)
    expected = model.generate([360], known=original[None], known_mask=known)[0]
    assert torch.equal(completed, expected)
    # the model input shown with its unknown part checkered: grey exactly where it is unknown
    grey = (as_tensor(shown)[0] == as_tensor(shown)[1]) & (as_tensor(shown)[1] == as_tensor(shown)[2])
    assert torch.equal(grey, ~known[0, 0])


def test_bad_input_is_one_status_line(store, ckpt, tmp_path):
    upload = save(tmp_path, "in.png", picture())
    sample = dict(spec=ckpt, classes=["1"], per_class=1, cfg=None, temperature=None, iterations="", seed=0)
    for changes, message in [(dict(classes=[]), "pick at least one class"),
                             (dict(iterations="4"), "needs one number per generator level"),
                             (dict(iterations="4,x"), "comma-separated integers"),
                             (dict(temperature=0), "temperature must be a finite number above 0"),
                             (dict(cfg=-1), "cfg must be a finite number of 0 or more"),
                             (dict(classes=["1", "2", "3"], per_class=8), "is over 16 images"),
                             (dict(seed=1.5), "seed must be a whole number"),
                             (dict(spec="other.pth"), "is not offered here")]:
        updates = list(app.sample_job(store, **{**sample, **changes}))
        assert updates == [(None, updates[0][1])] and updates[0][1].startswith("error: ") and message in updates[0][1]
    updates = list(app.complete_job(store, ckpt, upload, {"layers": []}, app.PAINTED, 0.5, "right", "1",
                                    None, None, "", 0))
    assert updates == [(None, None, "error: nothing is painted: paint over the region to regenerate, or pick a "
                                    "preset mask")]


def test_a_closed_job_stops_its_worker(store, ckpt):
    """A page that goes away mid-job (Gradio closes the generator) stops the sampling at the
    next step, and the next job starts only after that."""
    model = store.get(ckpt)
    calls = []
    real = model.generate

    def counting_generate(*args, progress=None, **kwargs):
        def counted(*a):
            calls.append(a[1])
            progress(*a)
        return real(*args, progress=counted, **kwargs)

    model.generate = counting_generate
    try:
        job = app.generate_steps(model, [1], 0, model.sampling_config(num_iter_list=(16, 16)))
        assert next(job)[0] == "step"
        job.close()
    finally:
        del model.generate
    assert not any(t.name == "fractalgen-sampler" for t in threading.enumerate())
    assert calls[-1] < 16  # stopped well before the 16 steps were done


def test_the_page_runs_one_job_at_a_time(store, monkeypatch):
    pytest.importorskip("gradio")
    # building the page switches gradio's and the Hub's telemetry off for the whole process
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "True")
    page, launch_kwargs = app.build_app(store)
    jobs = [fn for fn in page.fns.values() if fn.name in ("sample", "complete")]
    assert len(jobs) == 2 and {(fn.concurrency_id, fn.concurrency_limit) for fn in jobs} == {("sampler", 1)}
    assert "pixelated" in launch_kwargs["css"]


def test_send_changes_sends_each_picture_once():
    a, b = Image.new("RGB", (2, 2), 1), Image.new("RGB", (2, 2), 2)
    sent = list(app.send_changes([(a, "1"), (a.copy(), "2"), (b, "3")], unchanged=lambda: "same"))
    assert sent == [(a, "1"), ("same", "2"), (b, "3")]


def test_app_flags_fail_with_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no quickstart_out/ or pretrained_models/ here
    with pytest.raises(SystemExit, match="error: no checkpoint to serve: run `python demo/quickstart.py` first"):
        app.main([])
    with pytest.raises(SystemExit, match="error: checkpoint 'nope.pth' not found"):
        app.main(["--ckpt", "nope.pth"])
    with pytest.raises(SystemExit, match="error: --threads must be at least 1"):
        app.main(["--threads", "0"])
    assert app.default_threads() >= 1


def test_status_lines_carry_a_progress_bar_and_escape_text(store, ckpt):
    bar = app.ProgressBar()
    lines = [status for _, status in bar.show(app.sample_job(store, ckpt, ["1"], 1, None, None, "", 0, bar))]
    assert lines[0].startswith('<p class="status"><progress value="1" max="16"></progress> step 1/16: ')
    assert lines[-1].startswith('<p class="status">done in') and "<progress" not in lines[-1]
    escaped = '<p class="status">error: &lt;b&gt;x.png&lt;/b&gt; &amp; co</p>'
    assert app.status_html("error: <b>x.png</b> & co") == escaped


def test_without_ckpt_the_page_offers_the_checkpoints_it_finds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert app.default_checkpoints() == []
    for folder in ("quickstart_out/train", "pretrained_models/fractalmar_in64", "pretrained_models/fractalar_in64"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "checkpoint-last.pth").write_bytes(b"")
    assert app.default_checkpoints() == ["quickstart_out/train", "pretrained_models/fractalar_in64",
                                         "pretrained_models/fractalmar_in64"]


@pytest.mark.parametrize("channels, mode", [(1, "L"), (4, "RGBA")])
def test_a_grey_or_rgba_model_completes_an_upload_in_its_own_mode(channels, mode, tmp_path):
    """A colour upload is read in the model's mode (L: luma; RGBA: opaque) and the
    completion is a picture of that mode that keeps the known pixels."""
    model = create_model("fractalar_tiny", class_num=2, in_channels=channels)
    ckpt = tmp_path / "checkpoint-last.pth"
    torch.save({"model": model.state_dict(), "config": model.config}, ckpt)
    store = app.ModelStore([str(ckpt)], torch.device("cpu"))
    upload = save(tmp_path, "in.png", picture())
    updates = list(app.complete_job(store, str(ckpt), upload, None, "inpaint", 0.5, "right", "0", None, None, "2,2", 3))
    shown, out, status = updates[-1]
    assert status.startswith("done in") and out.mode == mode and shown.mode == mode
    original = torch.from_numpy(np.array(Image.fromarray(picture()).convert(mode))).reshape(16, 16, -1).permute(2, 0, 1)
    known = make_mask("inpaint", 16)[0, 0]
    completed = torch.from_numpy(np.array(out)).reshape(16, 16, -1).permute(2, 0, 1)
    assert completed.shape[0] == channels and torch.equal(completed[:, known], original[:, known])
    canvas = app.editor_canvas(app.read_upload(upload, 16, channels))
    assert canvas["background"].shape[:2] == (256, 256)
