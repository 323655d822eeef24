"""Web demo: sample a FractalGen class by class, or paint the part of a picture to regenerate.

    python demo/app.py                                        # the quick start's model, http://127.0.0.1:7860
    python demo/app.py --ckpt pretrained_models/fractalmar_in64 --ckpt quickstart_out/train

--ckpt takes what demo/sample.py --ckpt takes (repeat it to offer several models; the page
has a model picker). Models load when first picked, through models.load_model, and sample
through the same FractalGen.generate the CLI calls: a seed on the page gives the image
`demo/sample.py --seed` gives with the same settings. Jobs wait in a queue and run one at a
time (so a seed reproduces, whatever else the page is doing); the page shows the image
forming step by step and a progress bar.

The page has two tabs:
  Sample    classes by name (ImageNet models; torchvision's list, no download) or by id,
            cfg, temperature and iterations per level (defaults: the checkpoint's settings).
  Complete  upload a picture, paint over what to regenerate (or pick inpaint / outpaint /
            uncrop / edit), and get the completion; every pixel left unpainted is kept
            exactly (compare it with the "model input" image).
"""
import argparse
import glob
import html
import os
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

if __package__ in (None, ""):  # run as `python demo/app.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo.sample import sampling_precision  # noqa: E402
from models import load_model  # noqa: E402
from models.zoo import CHECKPOINT_NAME, DownloadError  # noqa: E402
from util.masks import SIDES, TASKS, make_mask  # noqa: E402
from util.misc import UserInputError, autocast, one_line  # noqa: E402
from util.validation import check_device, check_sampling_args, parse_num_iter_list, positive_int  # noqa: E402
from util.visualize import load_image, make_grid, show_known, to_pil  # noqa: E402

QUICKSTART_CKPT = os.path.join("quickstart_out", "train")
IMAGENET_EXAMPLES = (207, 360, 387, 974)  # golden retriever, otter, lesser panda, geyser
# uploads: bigger files or pictures are refused with one line before they are decoded
MAX_UPLOAD_MB = 20
MAX_UPLOAD_SIDE = 8192
MAX_ASPECT = 2.0          # the centre crop may drop at most half of a picture
MAX_SAMPLES = 16          # images per sampling job
OUTPUT_HEIGHT = 320       # pixels the page gives an output image (it is enlarged to fit)
EDITOR_SIZE = 256         # the painting canvas shows the model's input enlarged to about this size
PAINTED = "painted"       # mask choice: the region painted in the editor
PAINT_ALPHA = 128         # a canvas pixel counts as painted from this opacity on
STEP_CHECK_S = 0.5        # how often a waiting job looks whether its page is still there


class JobCancelled(Exception):
    """The page that asked for a job went away (or asked for another): stop sampling."""


# ---------------------------------------------------------------------- models
class ModelStore:
    """The checkpoints the page offers, loaded on first use through models.load_model and kept
    (at most `keep` of them: picking another drops the least recently used)."""

    def __init__(self, specs, device, download=False, keep=1):
        self.specs, self.device, self.download, self.keep = list(specs), device, download, keep
        self.loaded = {}  # spec -> model, least recently used first
        self.lock = threading.Lock()

    def get(self, spec):
        if spec not in self.specs:
            raise UserInputError(f"model {spec!r} is not offered here; pick one of {', '.join(self.specs)}")
        with self.lock:
            model = self.loaded.pop(spec, None)
            if model is None:
                while len(self.loaded) >= self.keep:
                    self.loaded.pop(next(iter(self.loaded)))
                model = load_model(spec, device=self.device, download=self.download)
            self.loaded[spec] = model
            return model


def default_checkpoints(root="pretrained_models"):
    """What the page offers without --ckpt: the quick start's checkpoint and every official
    checkpoint already in `root`."""
    found = [QUICKSTART_CKPT] if os.path.isfile(os.path.join(QUICKSTART_CKPT, CHECKPOINT_NAME)) else []
    found += sorted(os.path.dirname(p) for p in glob.glob(os.path.join(root, "*", CHECKPOINT_NAME)))
    return found


def imagenet_classes():
    """The 1,000 ImageNet class names in label order, from torchvision's weights metadata
    (shipped with torchvision: nothing is downloaded)."""
    from torchvision.models import ResNet50_Weights
    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def class_choices(model):
    """Dropdown entries for the model's classes: '207: golden retriever' for an ImageNet model
    (1,000 classes), plain ids otherwise."""
    if model.class_num == 1000:
        return [f"{i}: {name}" for i, name in enumerate(imagenet_classes())]
    return [str(i) for i in range(model.class_num)]


def parse_class(choice, model):
    """A dropdown entry or a typed id ('207', '207: golden retriever') -> the class id."""
    text = str(choice).split(":")[0].strip()
    try:
        label = int(text)
    except ValueError:
        raise UserInputError(f"class {choice!r} is not a class of this model; pick one from the list "
                             f"or type an id from 0 to {model.class_num - 1}") from None
    if not 0 <= label < model.class_num:
        raise UserInputError(f"class {label} is outside 0..{model.class_num - 1} for this model; "
                             f"pick one from the list")
    return label


def first_classes(model):
    """The classes the Sample tab starts with: the README's four for an ImageNet model."""
    if model.class_num == 1000:
        return list(IMAGENET_EXAMPLES)
    return list(range(min(4, model.class_num)))


def describe(model):
    """The model in a line, with its sampling settings and where they come from
    (FractalGen.describe_sampling), and the note that a sweep picks better ones where so."""
    weights = getattr(model, "weights", None)
    note = model.sampling_note()
    return (f"{model.model_name or 'model'}: {model.img_size}x{model.img_size} images, {model.class_num} classes"
            + (f", {weights} weights" if weights else "") + f"; sampling settings: {model.describe_sampling()}"
            + (f". {note[0].upper()}{note[1:]}" if note else ""))


def read_settings(model, cfg, temperature, iterations):
    """The page's sampling fields -> settings for generate(), checked like the CLI's flags;
    the rest (cfg schedule, filter) stays the checkpoint's."""
    temperature, cfg, _ = check_sampling_args(temperature, cfg, prefix="")
    num_iter_list = parse_num_iter_list(str(iterations).strip() or None, flag="iterations")
    levels = model.num_fractal_levels - 1
    if num_iter_list is not None and len(num_iter_list) != levels:
        raise UserInputError(f"iterations {iterations!r} needs one number per generator level ({levels}), "
                             f"e.g. {','.join(map(str, model.default_num_iter_list()))}")
    return model.sampling_config(cfg=cfg, temperature=temperature, num_iter_list=num_iter_list)


def settings_text(settings):
    iters = ",".join(map(str, settings["num_iter_list"]))
    return f"cfg {settings['cfg']:g}, temperature {settings['temperature']:g}, iterations {iters}"


# ---------------------------------------------------------------------- uploads and masks
def read_upload(path, size, channels=3):
    """An uploaded file -> uint8 (1, C, size, size), C = `channels` (the model's in_channels),
    as demo/sample.py --input reads it (short side resized, centre crop). UserInputError with one sentence for a file that is not a
    picture, too big, too small or too elongated for the model."""
    if not path:
        raise UserInputError("upload a picture first (PNG or JPEG)")
    name = os.path.basename(path)
    megabytes = os.path.getsize(path) / 2**20
    if megabytes > MAX_UPLOAD_MB:
        raise UserInputError(f"{name} is {megabytes:.0f} MB; upload a picture under {MAX_UPLOAD_MB} MB")
    try:
        img = Image.open(path)  # reads the header only: the size is checked before decoding
    except (OSError, Image.DecompressionBombError):
        raise UserInputError(f"{name} is not a picture this demo can read; upload a PNG or JPEG file") from None
    with img:
        w, h = img.size
        if max(w, h) > MAX_UPLOAD_SIDE:
            raise UserInputError(f"{name} is {w}x{h} pixels; upload a picture at most {MAX_UPLOAD_SIDE} pixels "
                                 f"on a side (the model sees {size}x{size})")
        if min(w, h) < size:
            raise UserInputError(f"{name} is {w}x{h} pixels, smaller than the model's {size}x{size}; upload a "
                                 f"picture at least {size} pixels on its short side")
        if max(w, h) > MAX_ASPECT * min(w, h):
            raise UserInputError(f"{name} is {w}x{h} pixels: the square centre crop the model needs would drop "
                                 f"more than half of it; crop it closer to a square first")
        try:
            return load_image(img, size, channels)
        except (OSError, SyntaxError, ValueError) as e:  # PIL decodes now: a truncated or broken file
            raise UserInputError(f"{name} cannot be decoded ({one_line(e)}); upload a PNG or JPEG file") from None


def editor_canvas(image):
    """uint8 (1, C, S, S) -> the painting canvas: the picture enlarged (nearest) to about
    EDITOR_SIZE pixels, as an ImageEditor value."""
    scale = max(1, EDITOR_SIZE // image.shape[-1])
    picture = np.asarray(to_pil(image[0], scale))
    return {"background": picture, "layers": [], "composite": picture}


def painted_mask(editor_value, size):
    """The ImageEditor's layers -> known mask bool (1, 1, size, size): a model pixel is
    unknown (regenerated) when any canvas pixel over it is painted."""
    layers = (editor_value or {}).get("layers") or []
    painted = None
    for layer in layers:
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[2] == 4:
            hit = torch.from_numpy(np.ascontiguousarray(layer[..., 3] >= PAINT_ALPHA))
            painted = hit if painted is None else painted | hit
    if painted is None or not painted.any():
        raise UserInputError("nothing is painted: paint over the region to regenerate, or pick a preset mask")
    unknown = F.adaptive_max_pool2d(painted[None, None].float(), size) > 0  # (1, 1, S, S)
    return ~unknown


def known_mask_for(choice, editor_value, size, frac, side):
    if choice == PAINTED:
        return painted_mask(editor_value, size)
    if choice not in TASKS:
        raise UserInputError(f"mask {choice!r} is unknown; pick {PAINTED} or one of {', '.join(TASKS)}")
    return make_mask(choice, size, frac=float(frac), side=side)


# ---------------------------------------------------------------------- sampling
def generate_steps(model, labels, seed, settings, known=None, known_mask=None, precision="auto"):
    """Run model.generate in a worker thread, yielding ("step", canvas uint8 (B, C, H, W),
    step, total) after each top-level step and finally ("done", images uint8 (B, C, H, W)).
    Closing the generator early (the page went away) stops the sampling at the next step."""
    updates, cancel = queue.Queue(), threading.Event()
    device = next(model.parameters()).device

    def progress(canvas, step, total):
        if cancel.is_set():
            raise JobCancelled
        updates.put(("step", canvas.cpu(), step, total))

    def work():
        try:
            torch.manual_seed(seed)
            with autocast(device, sampling_precision(device, precision)):
                images = model.generate(labels, known=known, known_mask=known_mask, progress=progress, **settings)
            updates.put(("done", images.cpu()))
        except BaseException as e:  # handed to the page's thread below
            updates.put(("error", e))

    worker = threading.Thread(target=work, name="fractalgen-sampler", daemon=True)
    worker.start()
    try:
        while True:
            item = updates.get()
            if item[0] == "error":
                raise item[1]
            yield item
            if item[0] == "done":
                return
    finally:
        cancel.set()
        worker.join()  # one job at a time: the next starts only when this one has stopped


def sample_job(store, spec, classes, per_class, cfg, temperature, iterations, seed, progress=None):
    """The Sample tab: yields (grid image or None, status line) as the samples form."""
    try:
        model = store.get(spec)
        chosen = [parse_class(c, model) for c in (classes or [])]
        if not chosen:
            raise UserInputError("pick at least one class")
        per_class = positive_int("samples per class", per_class)
        if len(chosen) * per_class > MAX_SAMPLES:
            raise UserInputError(f"{len(chosen)} classes x {per_class} samples is over {MAX_SAMPLES} images; "
                                 f"pick fewer classes or samples")
        seed = positive_int("seed", seed, minimum=0)
        settings = read_settings(model, cfg, temperature, iterations)
    except (UserInputError, DownloadError) as e:
        yield None, f"error: {one_line(e)}"
        return
    labels = [label for label in chosen for _ in range(per_class)]
    yield from run_job(model, labels, seed, settings, progress,
                       show=lambda imgs: to_pil(make_grid(imgs, nrow=per_class)))


def complete_job(store, spec, upload, editor_value, mask_choice, frac, side, choice, cfg, temperature,
                 iterations, seed, progress=None):
    """The Complete tab: yields (model input shown with its unknown part checkered, completion,
    status line)."""
    try:
        model = store.get(spec)
        image = read_upload(upload, model.img_size, model.in_channels)
        known_mask = known_mask_for(mask_choice, editor_value, model.img_size, frac, side)
        label = parse_class(choice, model)
        seed = positive_int("seed", seed, minimum=0)
        settings = read_settings(model, cfg, temperature, iterations)
    except (UserInputError, DownloadError) as e:
        yield None, None, f"error: {one_line(e)}"
        return
    shown = to_pil(show_known(image, known_mask)[0])
    for out, status in run_job(model, [label], seed, settings, progress, show=lambda imgs: to_pil(imgs[0]),
                               known=image, known_mask=known_mask):
        yield shown, out, status


def run_job(model, labels, seed, settings, progress, show, known=None, known_mask=None):
    """Yield (picture, status) per step and at the end; errors become one status line.
    progress: optional callable((step, total)), called before each step's yield."""
    start = time.time()
    what = f"{len(labels)} image(s) with {settings_text(settings)}, seed {seed}"
    try:
        for item in generate_steps(model, labels, seed, settings, known=known, known_mask=known_mask):
            if item[0] == "step":
                _, canvas, step, total = item
                if progress is not None:
                    progress((step, total))
                yield show(canvas), f"step {step}/{total}: {what}"
            else:
                yield show(item[1]), f"done in {time.time() - start:.1f}s: {what}"
    except (UserInputError, ValueError) as e:  # generate() rejects what the checks above let through
        yield None, f"error: {one_line(e)}"


# ---------------------------------------------------------------------- page
CSS = """
.status progress { width: 12em; vertical-align: middle; }
.pixels img { width: 100%; height: 100%; object-fit: contain; }
.pixels img, .pixels canvas { image-rendering: pixelated; }
"""


def status_html(status, position=None):
    """A job's status line as HTML, led by a progress bar while it samples (position: (step, total))."""
    bar = f'<progress value="{position[0]}" max="{position[1]}"></progress> ' if position else ""
    return f'<p class="status">{bar}{html.escape(status)}</p>'


class ProgressBar:
    """The `progress` callback of a job, and the status lines it shows with the bar."""

    def __init__(self):
        self.position = None

    def __call__(self, position):
        self.position = position

    def show(self, updates):
        for *pictures, status in updates:
            position, self.position = self.position, None
            yield (*pictures, status_html(status, position))


def send_changes(updates, unchanged):
    """Pass on a job's yields, replacing a picture equal to the one sent before in its place by
    `unchanged`. Gradio rewrites the cached file of a picture every time it is sent, which can
    cut short the page's download of that same file."""
    last = {}
    for values in updates:
        out = []
        for i, value in enumerate(values):
            if isinstance(value, Image.Image):
                key = (value.size, value.tobytes())
                if last.get(i) == key:
                    value = unchanged()
                else:
                    last[i] = key
            out.append(value)
        yield tuple(out)


def build_app(store):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    import gradio as gr

    first = store.specs[0]
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: works offline
    # the page's pictures are cached as files: those older than an hour are deleted every hour
    with gr.Blocks(title="FractalGen", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown("# FractalGen\nSample a class, or paint over part of a picture and let the model redo it.")
        with gr.Row():
            spec = gr.Dropdown(store.specs, value=first, label="model (checkpoint)", elem_id="model", scale=3)
            info = gr.HTML(elem_id="model-info")
        with gr.Row():
            cfg = gr.Number(label="cfg (guidance)", elem_id="cfg", minimum=0)
            temperature = gr.Number(label="temperature", elem_id="temperature", minimum=0)
            iterations = gr.Textbox(label="iterations per level", elem_id="iterations")
            seed = gr.Number(value=0, precision=0, minimum=0, label="seed", elem_id="seed")
        with gr.Tab("Sample", elem_id="tab-sample"):
            with gr.Row():
                classes = gr.Dropdown([], multiselect=True, label="classes (type a name or an id)",
                                      elem_id="classes", scale=3)
                per_class = gr.Slider(1, 8, value=2, step=1, label="samples per class", elem_id="per-class")
            sample_btn = gr.Button("Generate", variant="primary", elem_id="generate")
            sample_status = gr.HTML(elem_id="sample-status")
            sample_out = gr.Image(label="samples (one row per class)", format="png", type="pil", interactive=False,
                                  height=OUTPUT_HEIGHT, elem_id="samples", elem_classes="pixels")
        with gr.Tab("Complete", elem_id="tab-complete"):
            with gr.Row():
                upload = gr.File(label="picture to complete (PNG or JPEG)", file_types=["image"],
                                 type="filepath", elem_id="upload")
                with gr.Column():
                    mask_choice = gr.Radio([PAINTED, *TASKS], value=PAINTED, label="region to regenerate",
                                           elem_id="mask-choice")
                    frac = gr.Slider(0.1, 0.9, value=0.5, step=0.05, label="preset size (fraction of the side)")
                    side = gr.Dropdown(list(SIDES), value="right", label="uncrop side")
                    choice = gr.Dropdown([], label="class", elem_id="class")
            editor = gr.ImageEditor(label="paint over what to regenerate", type="numpy", image_mode="RGBA",
                                    sources=[], transforms=[], layers=False, elem_id="editor",
                                    elem_classes="pixels",
                                    brush=gr.Brush(default_size=24, colors=[("#00ff00", 0.7)], color_mode="fixed"))
            complete_btn = gr.Button("Complete", variant="primary", elem_id="complete")
            complete_status = gr.HTML(elem_id="complete-status")
            with gr.Row():
                shown = gr.Image(label="model input (checkered: regenerated)", format="png", type="pil",
                                 interactive=False, height=OUTPUT_HEIGHT, elem_id="model-input", elem_classes="pixels")
                completion = gr.Image(label="completion", format="png", type="pil", interactive=False,
                                      height=OUTPUT_HEIGHT, elem_id="completion", elem_classes="pixels")

        def pick_model(spec_value, upload_value):
            """Defaults of the picked model; the canvas redrawn at its size."""
            try:
                model = store.get(spec_value)
            except (UserInputError, DownloadError) as e:
                return (status_html(f"error: {one_line(e)}"),) + (gr.update(),) * 6
            settings = model.sampling_config()
            names = class_choices(model)
            canvas, note = gr.update(), ""
            if upload_value:
                try:
                    canvas = editor_canvas(read_upload(upload_value, model.img_size, model.in_channels))
                except UserInputError as e:
                    note = f" (the picture: {one_line(e)})"
            return (status_html(describe(model) + note), settings["cfg"], settings["temperature"],
                    ",".join(map(str, settings["num_iter_list"])),
                    gr.update(choices=names, value=[names[i] for i in first_classes(model)]),
                    gr.update(choices=names, value=names[0]), canvas)

        def take_upload(spec_value, upload_value):
            if not upload_value:
                return None, ""
            try:
                model = store.get(spec_value)
                return editor_canvas(read_upload(upload_value, model.img_size, model.in_channels)), ""
            except (UserInputError, DownloadError) as e:
                return None, status_html(f"error: {one_line(e)}")

        def sample(spec_value, classes_value, per_class_value, cfg_value, temperature_value, iterations_value,
                   seed_value):
            bar = ProgressBar()
            yield from bar.show(send_changes(sample_job(store, spec_value, classes_value, per_class_value, cfg_value,
                                                        temperature_value, iterations_value, seed_value, bar),
                                             gr.update))

        def complete(spec_value, upload_value, editor_value, mask_value, frac_value, side_value, choice_value,
                     cfg_value, temperature_value, iterations_value, seed_value):
            bar = ProgressBar()
            yield from bar.show(send_changes(complete_job(store, spec_value, upload_value, editor_value, mask_value,
                                                          frac_value, side_value, choice_value, cfg_value,
                                                          temperature_value, iterations_value, seed_value, bar),
                                             gr.update))

        model_outputs = [info, cfg, temperature, iterations, classes, choice, editor]
        spec.change(pick_model, [spec, upload], model_outputs, concurrency_id="load")
        app.load(pick_model, [spec, upload], model_outputs, concurrency_id="load")
        upload.change(take_upload, [spec, upload], [editor, complete_status])
        # both kinds of job share one worker: one job at a time, in order of arrival
        sample_btn.click(sample, [spec, classes, per_class, cfg, temperature, iterations, seed],
                         [sample_out, sample_status], concurrency_id="sampler", concurrency_limit=1,
                         show_progress="minimal")  # our own bar on the status line: the image stays visible
        complete_btn.click(complete, [spec, upload, editor, mask_choice, frac, side, choice, cfg, temperature,
                                      iterations, seed],
                           [shown, completion, complete_status], concurrency_id="sampler", concurrency_limit=1,
                           show_progress="minimal")
    app.queue(default_concurrency_limit=1)
    return app, dict(theme=theme, css=CSS)


def default_threads():
    """Half the CPU cores (at least one): the other half stays free for whatever else runs."""
    return max(1, (os.cpu_count() or 2) // 2)


def get_args_parser():
    p = argparse.ArgumentParser(description="Web demo: class samples and painted-region completion in a browser.")
    p.add_argument("--ckpt", action="append", default=None,
                   help="checkpoint file, folder or official model name, as for demo/sample.py; repeat to offer "
                        "several (default: quickstart_out/train and the official ones in pretrained_models/)")
    p.add_argument("--download", action="store_true", help="fetch an official checkpoint named by --ckpt if missing")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="CPU threads for torch (default: half the cores, so a shared machine keeps the rest)")
    p.add_argument("--keep_models", type=int, default=1,
                   help="models kept loaded at once; picking another drops the least recently used")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        app, launch_kwargs = prepare(args)
    except (UserInputError, DownloadError) as e:
        raise SystemExit(f"error: {one_line(e)}") from None
    print(f"serving {', '.join(app.fractalgen_store.specs)} on http://{args.host}:{args.port} (Ctrl-C stops)",
          file=sys.stderr)
    try:
        app.launch(server_name=args.host, server_port=args.port, max_file_size=f"{MAX_UPLOAD_MB * 2}mb",
                   show_error=False, quiet=True, footer_links=[], **launch_kwargs)
    except OSError as e:  # the port is taken, or the address is not this machine's
        raise SystemExit(f"error: cannot serve on {args.host}:{args.port} ({one_line(e).split('. ')[0]}); "
                         f"pass another --port or --host") from None


def prepare(args):
    """Check the flags and load the first model (so a bad checkpoint stops here, with one line)."""
    torch.set_num_threads(positive_int("--threads", args.threads))
    positive_int("--keep_models", args.keep_models)
    positive_int("--port", args.port, minimum=0)
    device = check_device(args.device)
    specs = args.ckpt or default_checkpoints()
    if not specs:
        raise UserInputError(f"no checkpoint to serve: run `python demo/quickstart.py` first (it writes "
                             f"{QUICKSTART_CKPT}) or pass --ckpt with a checkpoint file, folder or model name")
    store = ModelStore(dict.fromkeys(specs), device, download=args.download, keep=args.keep_models)
    store.get(store.specs[0])
    app, launch_kwargs = build_app(store)
    app.fractalgen_store = store
    return app, launch_kwargs


if __name__ == "__main__":
    main()
