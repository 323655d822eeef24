"""FractalGen: generators nested level by level down to a per-pixel head.

Level L splits its image into patches of size img_size_list[L+1]; its generator (AR or MAR)
produces one condition per patch, and the next level -- another FractalGen, or the
`PixelLoss` head at the last level -- models each patch given its condition.
"""
import functools

import numpy as np
import torch
import torch.nn as nn
from huggingface_hub import PyTorchModelHubMixin

from . import hub
from . import sampling as provenance
from .ar import AR, ARBlock
from .checks import NUM_LEVEL0_CONDS, SAMPLING_KEYS, check_architecture
from .layers import PIXEL_MEAN, PIXEL_STD, Block, check_fast, forget_stale_steps, pixel_norm
from .mar import MAR
from .pixelloss import PixelLoss

GENERATORS = {"ar": AR, "mar": MAR}
# the official sample() defaults, used where neither the caller nor the model says otherwise
API_SAMPLING = dict(cfg=1.0, cfg_schedule="linear", temperature=1.0, filter_threshold=1e-4)
MAX_DEFAULT_ITERS = 64


class CheckpointMismatchError(ValueError):
    """A state_dict that does not fit the model's architecture."""


class FractalGen(nn.Module, PyTorchModelHubMixin, **hub.CARD_INFO):
    def __init__(self, img_size_list, embed_dim_list, num_blocks_list, num_heads_list,
                 generator_type_list, label_drop_prob=0.1, class_num=1000, attn_dropout=0.1,
                 proj_dropout=0.1, guiding_pixel=False, num_conds=1, r_weight=1.0,
                 grad_checkpointing=False, fractal_level=0, in_channels=3, pixel_mean=None, pixel_std=None):
        """Keywords as in SPEC.md, plus (additions) in_channels: the channels of a pixel (3:
        RGB, the official architecture; 1: grey; 4: RGBA; any count >= 1), and pixel_mean /
        pixel_std: the normalisation of each channel (None: layers.pixel_norm, ImageNet's for
        colour, 0.5 / 0.5 for the rest)."""
        super().__init__()
        if fractal_level == 0:
            # the configuration record: every keyword but fractal_level, as plain JSON types
            keywords = dict(img_size_list=img_size_list, embed_dim_list=embed_dim_list,
                            num_blocks_list=num_blocks_list, num_heads_list=num_heads_list,
                            generator_type_list=generator_type_list, label_drop_prob=label_drop_prob,
                            class_num=class_num, attn_dropout=attn_dropout, proj_dropout=proj_dropout,
                            guiding_pixel=guiding_pixel, num_conds=num_conds, r_weight=r_weight,
                            grad_checkpointing=grad_checkpointing, in_channels=in_channels,
                            pixel_mean=pixel_mean, pixel_std=pixel_std)
            check_architecture(keywords)
            default_mean, default_std = pixel_norm(in_channels)
            pixel_mean = keywords["pixel_mean"] = tuple(pixel_mean or default_mean)
            pixel_std = keywords["pixel_std"] = tuple(pixel_std or default_std)
            self._keywords = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in keywords.items()}
        self.fractal_level = fractal_level
        self.in_channels = in_channels
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        # set by models.create_model / models.load_model: the configuration's name, the
        # default sampling settings its record holds, the sampling settings generate()
        # uses for arguments it is not given (None: the official API's), where each of
        # those came from (models.sampling: a dict of sources by key), and the checkpoint file
        # with its training position (epoch, step)
        self.model_name = None
        self.record_sampling = None
        self.sampling_defaults = None
        self.sampling_sources = None
        self.checkpoint_path = self.checkpoint_position = None
        # which weights the model holds: "raw" (as trained) or "ema" (the moving average a
        # checkpoint stores as 'model_ema', which models.load_model prefers)
        self.weights = "raw"
        self.num_fractal_levels = len(img_size_list)
        self.img_size_list = tuple(img_size_list)
        L = fractal_level

        if L == 0:
            self.class_num = class_num
            self.label_drop_prob = label_drop_prob
            self.class_emb = nn.Embedding(class_num, embed_dim_list[0])
            self.fake_latent = nn.Parameter(torch.zeros(1, embed_dim_list[0]))
            nn.init.normal_(self.class_emb.weight, std=0.02)
            nn.init.normal_(self.fake_latent, std=0.02)

        generator_cls = GENERATORS[generator_type_list[L]]
        self.generator = generator_cls(
            seq_len=(img_size_list[L] // img_size_list[L + 1]) ** 2,
            patch_size=img_size_list[L + 1],
            cond_embed_dim=embed_dim_list[L - 1] if L > 0 else embed_dim_list[0],
            embed_dim=embed_dim_list[L],
            num_blocks=num_blocks_list[L],
            num_heads=num_heads_list[L],
            attn_dropout=attn_dropout,
            proj_dropout=proj_dropout,
            guiding_pixel=guiding_pixel and L > 0,
            num_conds=num_conds,
            grad_checkpointing=grad_checkpointing,
            in_channels=in_channels,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
        )
        if L < self.num_fractal_levels - 2:
            self.next_fractal = FractalGen(
                img_size_list, embed_dim_list, num_blocks_list, num_heads_list, generator_type_list,
                label_drop_prob=label_drop_prob, class_num=class_num, attn_dropout=attn_dropout,
                proj_dropout=proj_dropout, guiding_pixel=guiding_pixel, num_conds=num_conds,
                r_weight=r_weight, grad_checkpointing=grad_checkpointing, fractal_level=L + 1,
                in_channels=in_channels, pixel_mean=pixel_mean, pixel_std=pixel_std)
        else:
            self.next_fractal = PixelLoss(
                c_channels=embed_dim_list[L], width=embed_dim_list[L + 1],
                depth=num_blocks_list[L + 1], num_heads=num_heads_list[L + 1], r_weight=r_weight,
                in_channels=in_channels, pixel_mean=pixel_mean, pixel_std=pixel_std)
        if isinstance(self.generator, MAR):
            # a MAR level below reads num_conds conditions, an AR level or the pixel head one:
            # the generator then computes only those (and the outputs they come from)
            below = getattr(self.next_fractal, "generator", None)
            self.generator.num_next_conds = below.num_conds if isinstance(below, MAR) else 1

    # ------------------------------------------------------------------ helpers
    @property
    def img_size(self):
        return self.img_size_list[self.fractal_level]

    @property
    def num_generator_levels(self):
        return self.num_fractal_levels - 1 - self.fractal_level

    def levels(self):
        """This FractalGen and every nested one, top to bottom."""
        level = self
        while isinstance(level, FractalGen):
            yield level
            level = level.next_fractal

    @property
    def config(self):
        """The configuration record of this model: a plain, JSON-able dict of every
        constructor keyword (lists for the per-level ones), plus 'sampling', the default
        sampling settings of the record it was built from, where it has them.
        `models.create_model(model.config)` builds the same architecture; checkpoints store
        this dict under 'config'."""
        record = {k: list(v) if isinstance(v, list) else v for k, v in self._keywords.items()}
        if self.record_sampling:
            record["sampling"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.record_sampling.items()}
        return record

    def default_num_iter_list(self):
        return tuple(min(level.generator.seq_len, MAX_DEFAULT_ITERS) for level in self.levels())

    def check_images(self, imgs):
        C = self.in_channels
        if imgs.ndim != 4 or imgs.shape[1] != C or imgs.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected images of shape (B, {C}, {self.img_size}, {self.img_size}) for this "
                             f"model, got {tuple(imgs.shape)}; resize the data or pick the model "
                             f"built for that size" + ("" if imgs.ndim != 4 or imgs.shape[1] == C else
                                                       f" (and {C} channel(s): in_channels)"))

    def to_uint8(self, imgs):
        """Normalised (B, C, H, W) -> uint8 pixel values, with this model's normalisation."""
        return to_uint8(imgs, self.pixel_mean, self.pixel_std)

    def from_uint8(self, imgs):
        """uint8 (B, C, H, W) -> this model's normalised float32."""
        return from_uint8(imgs, self.pixel_mean, self.pixel_std)

    def check_labels(self, labels):
        if labels.dtype.is_floating_point or labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.class_num):
            raise ValueError(f"labels must lie in [0, {self.class_num}) for this model (class_num="
                             f"{self.class_num}); got values from {labels.min().item()} to {labels.max().item()}")

    def class_condition(self, labels):
        """(B,) labels -> (B, D) class embedding with label dropout (training) or the
        unconditional `fake_latent` for every sample (eval: unconditional likelihood)."""
        emb = self.class_emb(labels)
        fake = self.fake_latent.to(emb.dtype).expand_as(emb)
        if not self.training:
            return fake
        drop = torch.rand(labels.shape[0], device=labels.device) < self.label_drop_prob
        return torch.where(drop.unsqueeze(-1), fake, emb)

    # ------------------------------------------------------------------ training / NLL
    def forward(self, imgs, labels):
        """imgs: (B, C, H, W) normalised (RGB: ImageNet); labels: (B,) class ids at level 0 (a
        condition list at deeper levels). Returns the scalar loss in nats per sub-pixel;
        in eval mode the unconditional NLL (plus guiding-pixel terms where present)."""
        if self.fractal_level == 0:
            self.check_images(imgs)
            self.check_labels(labels)
            cond_list = [self.class_condition(labels)] * NUM_LEVEL0_CONDS
        else:
            cond_list = labels
        patches, cond_list, guiding_loss = self.generator(imgs, cond_list)
        return self.next_fractal(patches, cond_list) + guiding_loss

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, cond_list, num_iter_list, cfg, cfg_schedule, temperature, filter_threshold,
               fractal_level, visualize=False, known=None, known_mask=None, fast=False):
        """Official sampling API.

        cond_list: conditions (B, C) for this level (level 0: five references to the class
        embedding); with cfg != 1 every condition holds 2B rows, 0..B-1 conditional and
        B..2B-1 unconditional (`fake_latent` at level 0). num_iter_list: one iteration
        count per generator level. Deeper levels always use the constant schedule with the
        cfg their parent hands them. visualize: False, or a callable(images (B, C, H, W)
        normalised, step, total) called after every step of this level.
        known / known_mask (additions): (B, C, H, W) pixels to keep and where.
        fast (addition): see `generate`.
        Returns (B, C, H, W) normalised images on the k/255 grid.
        """
        if len(num_iter_list) != self.num_fractal_levels - 1:
            raise ValueError(f"num_iter_list needs one entry per generator level "
                             f"({self.num_fractal_levels - 1}), got {list(num_iter_list)}")
        if cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
        if isinstance(self.next_fractal, FractalGen):
            next_level = functools.partial(self.next_fractal.sample, num_iter_list=num_iter_list,
                                           cfg_schedule="constant", fractal_level=fractal_level + 1, fast=fast)
        else:
            next_level = functools.partial(self.next_fractal.sample, fast=fast)
            next_level.pixel_head = self.next_fractal  # lets a fast AR level fuse its steps with the draws
        if visualize is True:
            visualize = False  # the official flag drives Colab widgets; pass a callable instead
        if fast == "frozen" and self.fractal_level == 0:
            forget_stale_steps(self)  # compiled CPU steps hold copies of the weights
        return self.generator.sample(cond_list, num_iter_list[fractal_level], cfg, cfg_schedule,
                                     temperature, filter_threshold, next_level, visualize,
                                     known=known, known_mask=known_mask, fast=fast)

    @torch.no_grad()
    def sampling_config(self, **given):
        """The settings generate() uses: each of SAMPLING_KEYS from `given` when not None,
        else from `self.sampling_defaults` (set by models.load_model from the checkpoint, in
        the order models.sampling describes: stored settings, a trained checkpoint's run
        flags or neutral ones, the model's DEFAULT_SAMPLING), else the official API's: cfg 1,
        temperature 1, linear schedule, filter 1e-4 and min(patches, 64) iterations per level."""
        unknown = set(given) - set(SAMPLING_KEYS)
        if unknown:
            raise TypeError(f"unknown sampling settings {sorted(unknown)}; expected {', '.join(SAMPLING_KEYS)}")
        settings = {**API_SAMPLING, "num_iter_list": self.default_num_iter_list(), **(self.sampling_defaults or {})}
        settings.update({k: v for k, v in given.items() if v is not None})
        settings["num_iter_list"] = tuple(settings["num_iter_list"])
        return settings

    def sampling_origins(self, **given):
        """Where each setting of sampling_config(**given) comes from: a dict of sources by
        key, plain JSON (models.sampling): {"by": "caller"} for `given`, the checkpoint's
        stored source ({"by": "sweep", "fid": ..., "num_images": ...}, {"by": "quick start"}),
        {"by": "training run"}, {"by": "neutral"}, {"by": "model", "model": name} or
        {"by": "official API"}."""
        self.sampling_config(**given)  # the same check of the keys
        sources = self.sampling_sources or {}
        out = {}
        for key in SAMPLING_KEYS:
            if given.get(key) is not None:
                out[key] = {"by": provenance.BY_CALLER}
            elif key in (self.sampling_defaults or {}):
                out[key] = dict(sources.get(key) or {"by": provenance.BY_SET})
            else:
                out[key] = {"by": provenance.BY_API}
        return out

    def describe_sampling(self, **given):
        """sampling_config(**given) and sampling_origins(**given) as one line, e.g. 'cfg 2,
        temperature 1 (sweep, FID 12.30 on 500 images); num_iter_list 16,16, ... (fractalmar_tiny's
        defaults)'."""
        return provenance.describe(self.sampling_config(**given), self.sampling_origins(**given))

    def sampling_note(self, **given):
        """One line saying that `python -m util.sweep` picks better settings, when the cfg or
        temperature of this call were not measured for these weights (see
        models.sampling.sweep_note); else None."""
        return provenance.sweep_note(self.sampling_origins(**given), self.checkpoint_path)

    @torch.no_grad()
    def generate(self, labels, num_iter_list=None, cfg=None, cfg_schedule=None, temperature=None,
                 filter_threshold=None, known=None, known_mask=None, progress=None, fast=False):
        """Class labels in, uint8 images out.

        Sampling settings left at None come from `sampling_config` (for a model from
        models.load_model: those stored with its checkpoint, else the model's defaults).

        labels: (B,) ints (tensor or list). known: optional uint8 (B, C, H, W) image and
        known_mask: bool broadcastable to it (True = keep that pixel/channel exactly); the
        rest is generated conditioned on it (inpainting, outpainting, uncropping, editing).
        progress: optional callable(images uint8 (B, C, H, W), step, total) after each
        top-level step.
        fast: False (default) draws the official random stream, so a seed gives the
        official images bit for bit. True runs static-shape decode steps (preallocated
        key/value caches, rows padded to fixed sizes, no host syncs) compiled with
        torch.compile: several times faster at small batch once compiled, the same
        distribution, other random draws; the compiled code is cached on disk, so a new
        process starts sooner. "frozen" (CPU) also freezes the weights into the graphs,
        whose matmuls then compile to inductor's own C++ kernels: faster again once
        compiled, but compiled anew in every process (see layers.step_function); meant for
        long jobs such as --evaluate_gen. "eager" runs the steps uncompiled (tests).
        Conditional generation (known) always takes the official path.
        Returns uint8 (B, C, H, W) on the model's device (C = in_channels).
        """
        check_fast(fast)
        device = self.fake_latent.device
        labels = torch.as_tensor(labels, device=device)
        if labels.ndim == 0:
            labels = labels.unsqueeze(0)
        self.check_labels(labels)
        settings = self.sampling_config(num_iter_list=num_iter_list, cfg=cfg, cfg_schedule=cfg_schedule,
                                        temperature=temperature, filter_threshold=filter_threshold)
        num_iter_list, cfg, cfg_schedule = settings["num_iter_list"], settings["cfg"], settings["cfg_schedule"]
        temperature, filter_threshold = settings["temperature"], settings["filter_threshold"]
        B, S = labels.shape[0], self.img_size
        known_norm = mask = None
        if known is not None:
            known_norm, mask = prepare_known(known, known_mask, B, S, device, self)

        was_training = self.training
        self.eval()
        try:
            emb = self.class_emb(labels)
            if cfg != 1.0:
                emb = torch.cat([emb, self.fake_latent.expand(B, -1)])
            visualize = False
            if progress is not None:
                visualize = lambda imgs, step, total: progress(self.to_uint8(imgs), step, total)
            imgs = self.sample([emb] * NUM_LEVEL0_CONDS, num_iter_list, cfg, cfg_schedule, temperature,
                               filter_threshold, fractal_level=0, visualize=visualize,
                               known=known_norm, known_mask=mask, fast=fast)
        finally:
            self.train(was_training)
        return self.to_uint8(imgs)

    # ------------------------------------------------------------------ Hub folders
    def save_pretrained(self, save_directory, *, config=None, model_card_kwargs=None, **kwargs):
        """Write a Hub folder: config.json (`models.hub.folder_config`: the configuration
        record, the sampling settings, which weights), model.safetensors and README.md (a
        model card, kept if the folder has one). push_to_hub(repo_id) uploads the same
        folder (huggingface_hub's PyTorchModelHubMixin does both)."""
        return super().save_pretrained(save_directory, config=config or hub.folder_config(self),
                                       model_card_kwargs=model_card_kwargs or hub.card_kwargs(self), **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, device="cpu", revision=None, **hub_kwargs):
        """The model of a Hub folder: a local folder, or a Hub repository id ("user/name",
        or "hf-hub:user/name@revision") downloaded through huggingface_hub (hub_kwargs:
        cache_dir, force_download, local_files_only, token). Same as models.load_model."""
        from .loading import load_pretrained  # models.loading builds models through models.config, which imports this module
        return load_pretrained(pretrained_model_name_or_path, device=device, revision=revision, **hub_kwargs)

    # ------------------------------------------------------------------ speed options
    def compile_blocks(self, **compile_kwargs):
        """torch.compile every transformer block in place: an opt-in speed-up for training,
        NLL evaluation and sampling (elementwise work fused, fewer launches per token). The
        recursion, masking and sampling loops stay eager (data-dependent shapes, Python
        control flow), so shapes are marked dynamic. Floats differ from eager at rounding
        level. Returns self."""
        compile_kwargs.setdefault("dynamic", True)
        # one compiled graph per block kind, width, mode (train / eval / cached step) and
        # level: more than dynamo's default of 8 per function
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for module in self.modules():
            if isinstance(module, (Block, ARBlock)):
                module.compile(**compile_kwargs)
        return self

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict, strict=True, assign=False):
        """As nn.Module's, but a checkpoint of another configuration raises
        CheckpointMismatchError naming the keys and shapes that differ."""
        if strict:
            check_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


# ---------------------------------------------------------------------- functions
def to_uint8(imgs, mean=PIXEL_MEAN, std=PIXEL_STD):
    """Normalised (B, C, H, W) -> uint8 pixel values; mean / std: one per channel
    (default ImageNet's, RGB; a model's own: FractalGen.to_uint8)."""
    mean = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)
    return ((imgs.float() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


def from_uint8(imgs, mean=PIXEL_MEAN, std=PIXEL_STD):
    """uint8 (B, C, H, W) -> normalised float32 (default ImageNet's statistics, RGB)."""
    mean = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)
    return (imgs.float() / 255 - mean) / std


def prepare_known(known, known_mask, batch, size, device, model):
    """Validate a known image and mask for conditional generation -> (normalised values,
    bool mask), both (B, C, S, S) with C = model.in_channels."""
    C = model.in_channels
    if not torch.is_tensor(known):  # a PIL image or a NumPy array
        known = np.array(known)
    known = torch.as_tensor(known, device=device)
    given = tuple(known.shape)
    if known.dtype != torch.uint8:
        raise ValueError(f"known must be a uint8 image tensor (B, {C}, H, W) of pixel values, got {known.dtype}")
    if known.ndim == 2 and C == 1:  # (H, W): a greyscale PIL image or array
        known = known.unsqueeze(0)
    if known.ndim == 3:
        known = known.unsqueeze(0)
    if known.ndim == 4 and known.shape[-1] == C and known.shape[1] != C:  # (B, H, W, C): PIL's and NumPy's layout
        known = known.permute(0, 3, 1, 2)
    if known.ndim != 4 or known.shape[1:] != (C, size, size) or known.shape[0] not in (1, batch):
        rows = "1" if batch == 1 else f"1 or {batch}"
        raise ValueError(f"known must be images of shape ({rows}, {C}, {size}, {size}) or ({size}, {size}, {C}), got "
                         f"{given}; util.visualize.load_image(path, {size}, {C}) reads an image file at this size")
    if known_mask is None:
        raise ValueError("known_mask is required with known: True where a pixel (or channel) is given")
    mask = torch.as_tensor(known_mask, device=device).bool()
    try:
        mask = torch.broadcast_to(mask, (batch, C, size, size))
    except RuntimeError:
        raise ValueError(f"known_mask of shape {tuple(mask.shape)} does not broadcast to "
                         f"({batch}, {C}, {size}, {size})") from None
    return model.from_uint8(known.expand(batch, -1, -1, -1)), mask.contiguous()


def check_state_dict(model, state_dict):
    """Raise CheckpointMismatchError listing what differs between a state_dict and the model."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])
    if not (missing or unexpected or wrong_shape):
        return

    def show(keys, fmt):
        listed = ", ".join(fmt(k) for k in keys[:5])
        return listed + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

    parts = []
    if wrong_shape:
        parts.append(f"{len(wrong_shape)} shape mismatch(es): " +
                     show(wrong_shape, lambda k: f"{k} checkpoint {list(given[k])} vs model {list(expected[k])}"))
    if missing:
        parts.append(f"{len(missing)} key(s) missing from the checkpoint: " + show(missing, str))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) in the checkpoint: " + show(unexpected, str))
    raise CheckpointMismatchError(
        "checkpoint does not match this model configuration (was it saved from another --model, "
        "img_size, class_num, num_conds or guiding_pixel? models.load_model(path) reads them from the "
        "checkpoint): " + "; ".join(parts))
