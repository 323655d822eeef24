"""PixelLoss: the per-pixel head that models the 256-way channel values (r, g, b; or grey;
or r, g, b, alpha; ...) autoregressively, one channel after another."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (Block, KVCache, StaticKVCache, init_weights, pad_halves, pixel_norm, run_blocks, static_caches,
                     step_function)

NUM_LEVELS = 256  # 8-bit pixel values
# Parameter-name prefixes of the channels by count (r_codebook, r_mlm, ...): the official
# RGB names, grey (l) and alpha (a) after PIL's modes L, LA, RGB, RGBA; c0, c1, ... beyond.
CHANNEL_NAMES = {1: ("l",), 2: ("l", "a"), 3: ("r", "g", "b"), 4: ("r", "g", "b", "a")}


def channel_names(in_channels):
    return CHANNEL_NAMES.get(in_channels) or tuple(f"c{i}" for i in range(in_channels))


class MlmLayer(nn.Module):
    """Logits against a tied codebook: h @ codebook^T + bias (the bias is the only weight)."""

    def __init__(self, vocab_size=NUM_LEVELS):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, vocab_size))

    def forward(self, h, codebook):
        return torch.addmm(self.bias, h, codebook.t())


class PixelLoss(nn.Module):
    """A causal transformer over the tokens [condition, channel 0, channel 1, ...].

    Position 0 predicts the first channel (red) from the condition, position 1 the second
    (green, having seen red), and so on: C channels, C positions. Each channel has its own
    codebook, tied between input embedding and output logits. With the default 3 channels
    this is the official head ([condition, r, g, b], r_codebook, ..., b_mlm).
    pixel_mean / pixel_std: the normalisation of each channel (default: layers.pixel_norm).
    """

    def __init__(self, c_channels, width, depth, num_heads, r_weight=1.0, in_channels=3, pixel_mean=None,
                 pixel_std=None):
        super().__init__()
        self.r_weight = r_weight
        self.in_channels = in_channels
        default_mean, default_std = pixel_norm(in_channels)
        # not in the state_dict: the official checkpoints do not hold them
        self.register_buffer("pix_mean", torch.tensor(tuple(pixel_mean or default_mean)), persistent=False)
        self.register_buffer("pix_std", torch.tensor(tuple(pixel_std or default_std)), persistent=False)

        self.names = channel_names(in_channels)
        self.cond_proj = nn.Linear(c_channels, width)
        for name in self.names:
            setattr(self, f"{name}_codebook", nn.Embedding(NUM_LEVELS, width))
        self.ln = nn.LayerNorm(width, eps=1e-6)
        self.blocks = nn.ModuleList([Block(width, num_heads, mlp_ratio=4.0, causal=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        for name in self.names:
            setattr(self, f"{name}_mlm", MlmLayer())
        self.initialize_weights()

    def initialize_weights(self):
        for codebook in self.codebooks():
            nn.init.normal_(codebook.weight, std=0.02)
        self.apply(init_weights)

    def codebooks(self):
        return tuple(getattr(self, f"{name}_codebook") for name in self.names)

    def heads(self):
        return tuple(getattr(self, f"{name}_mlm") for name in self.names)

    def to_pixel_ids(self, x):
        """(N, C) normalised values -> (N, C) integer pixel values, exact for values on
        the k/255 grid."""
        return ((x * self.pix_std + self.pix_mean) * 255).round().long().clamp(0, NUM_LEVELS - 1)

    def from_pixel_ids(self, ids):
        """(N, C) integer pixel values -> normalised floats."""
        return (ids.float() / 255 - self.pix_mean) / self.pix_std

    def channel_logits(self, h, channel):
        """h: (N, W) hidden state at the position that predicts `channel` -> (N, 256) float32."""
        codebook = self.codebooks()[channel].weight
        if not torch.is_autocast_enabled(h.device.type):  # skip the context: sampling calls this per pixel
            return self.heads()[channel](h.float(), codebook.float())
        with torch.autocast(device_type=h.device.type, enabled=False):
            return self.heads()[channel](h.float(), codebook.float())

    def predict(self, target, cond_list):
        """target: (N, C) normalised pixels; cond_list[0]: (N, D).
        Returns logits (N, C, 256) in float32 and the integer targets (N, C)."""
        h, ids = self.hidden(target, cond_list)
        return torch.stack([self.channel_logits(h[:, c], c) for c in range(self.in_channels)], dim=1), ids

    def hidden(self, target, cond_list):
        """target: (N, C) normalised pixels; cond_list[0]: (N, D). Returns the states
        (N, C, W) that predict each channel, and the integer targets (N, C)."""
        target = target.reshape(target.shape[0], self.in_channels)
        # (quirk) a tiny dither before rounding breaks banker's-rounding ties the way the
        # pretrained weights saw them
        values = (target * self.pix_std + self.pix_mean) * 255
        # the clamp only matters for out-of-range input, which would otherwise fail deep in an embedding lookup
        ids = (values + 1e-2 * torch.randn_like(values)).round().long().clamp(0, NUM_LEVELS - 1)
        # The last channel's token is left out: its output predicts nothing and, the
        # attention being causal, no other position sees it, so positions 0..C-1 are the
        # same without it.
        codebooks = self.codebooks()
        x = torch.stack([self.cond_proj(cond_list[0])] +
                        [codebooks[c](ids[:, c]) for c in range(self.in_channels - 1)], dim=1)  # (N, C, W)
        return self.norm(run_blocks(self.blocks, self.ln(x))), ids

    def forward(self, target, cond_list):
        """Mean cross-entropy (nats per sub-pixel) of `target` (N, C[, 1, 1]) given
        cond_list[0] (N, D). Training weighs the first channel (red) by r_weight; eval is
        the plain mean."""
        h, ids = self.hidden(target, cond_list)
        # one cross-entropy per channel: the (N, C, 256) logits are never stacked
        ce = torch.stack([F.cross_entropy(self.channel_logits(h[:, c], c), ids[:, c], reduction="none")
                          for c in range(self.in_channels)], dim=1)  # (N, C)
        if self.training:
            loss = self.r_weight * ce[:, 0]
            for c in range(1, self.in_channels):
                loss = loss + ce[:, c]
            loss = loss / (self.r_weight + (self.in_channels - 1))
        else:
            loss = ce.mean(dim=1)
        return loss.mean()

    @torch.no_grad()
    def sample(self, cond_list, temperature, cfg, filter_threshold=0, known=None, known_mask=None, fast=False):
        """Draw the channels in turn (r, g, b). cond_list[0]: (N, D), or (2N, D) when cfg != 1
        (rows 0..N-1 conditional, N..2N-1 unconditional). known / known_mask: optional
        (N, C) normalised values and bools; known channels are taken instead of drawn (and
        the later channels are conditioned on them). Returns (N, C) normalised pixels.

        Each channel is one cached step of the causal transformer, so the C passes cost
        one token each. fast (True, "frozen" or "eager", without known): the C steps as
        one fixed-shape function (`draw_pixels`), rows padded to a power of two.
        """
        cond = cond_list[0]
        if fast and known is None:
            return self.sample_static(cond, temperature, cfg, filter_threshold, fast)
        guided = cfg != 1.0
        C = self.in_channels
        n = cond.shape[0] // 2 if guided else cond.shape[0]
        known_ids = self.to_pixel_ids(known.reshape(n, C)) if known is not None else None
        known_mask = known_mask.reshape(n, C) if known is not None else None
        caches = [KVCache(max_len=C) for _ in self.blocks]
        x = self.cond_proj(cond).unsqueeze(1)  # (rows, 1, W)
        ids = torch.empty(n, C, dtype=torch.long, device=cond.device)
        for c in range(C):
            # (quirk) The official sampler re-runs the training forward for every channel,
            # which dithers its (here unused) targets with 0.01 * randn: (rows, C) normals per
            # channel. Drawing them too keeps the random stream in step with the official
            # code, so a seed gives the official images bit for bit (tests/test_parity.py).
            torch.randn(cond.shape[0], C, device=cond.device)
            h = self.norm(run_blocks(self.blocks, self.ln(x), caches=caches))[:, 0]
            logits = self.channel_logits(h, c)
            # (quirk) temperature multiplies the logits; the pretrained settings assume it
            if temperature != 1.0:
                logits = logits * temperature
            if guided:
                logits = guided_logits(logits[:n], logits[n:], cfg, filter_threshold)
            ids[:, c] = sample_categorical(torch.softmax(logits, dim=-1))
            if known_ids is not None:
                ids[:, c] = torch.where(known_mask[:, c], known_ids[:, c], ids[:, c])
            if c < C - 1:
                next_ids = torch.cat([ids[:, c], ids[:, c]]) if guided else ids[:, c]
                x = self.codebooks()[c](next_ids).unsqueeze(1)
        return self.from_pixel_ids(ids)


    def sample_static(self, cond, temperature, cfg, filter_threshold, fast):
        """`sample` without known pixels through `draw_pixels` on padded rows."""
        guided = cfg != 1.0
        n = cond.shape[0] // 2 if guided else cond.shape[0]
        size = bucket_size(n)
        # tensors, not floats: a float argument would be a constant of the compiled graph
        temperature = torch.tensor(float(temperature), device=cond.device)
        cfg = torch.tensor(float(cfg), device=cond.device)
        draw = step_function(PixelLoss.draw_pixels, fast, device=cond.device, rows=(1 + guided) * size)
        padded = pad_halves(cond, 1 + guided, size)  # conditional rows [, unconditional rows], each padded
        return draw(self, padded, temperature, cfg, filter_threshold, guided)[:n]

    def draw_pixels(self, cond, temperature, cfg, filter_threshold, guided):
        """Every channel of every row in one fixed-shape function (one graph under
        torch.compile). cond: (rows, D) laid out as in `sample`; temperature, cfg: 0-d
        tensors. Returns (n, C) normalised pixels."""
        rows = cond.shape[0]
        C = self.in_channels
        n = rows // 2 if guided else rows
        x = self.cond_proj(cond).unsqueeze(1)  # (rows, 1, W)
        heads = self.blocks[0].attn.num_heads
        buffers = StaticKVCache.buffers(rows, heads, C, x.shape[-1] // heads, x, len(self.blocks))
        ids = []
        for c in range(C):
            pos = torch.full((1,), c, dtype=torch.long, device=cond.device)
            h = self.norm(run_blocks(self.blocks, self.ln(x), caches=static_caches(buffers, pos)))[:, 0]
            logits = self.channel_logits(h, c) * temperature  # (quirk) temperature multiplies
            if guided:
                logits = guided_logits(logits[:n], logits[n:], cfg, filter_threshold)
            ids.append(sample_categorical(torch.softmax(logits, dim=-1)))
            if c < C - 1:
                next_ids = torch.cat([ids[c], ids[c]]) if guided else ids[c]
                x = self.codebooks()[c](next_ids).unsqueeze(1)
        return self.from_pixel_ids(torch.stack(ids, dim=1))


def bucket_size(n):
    """Rows a fixed-shape step is run at for n real rows: the next power of two, so that
    a varying row count compiles a few graphs (at most 2x the rows)."""
    return 1 << max(n - 1, 0).bit_length()


def sample_categorical(probs):
    """One draw per row of (N, V) probabilities -> (N,) ids.

    The same draws from the same random numbers as torch.multinomial(probs, 1), whose
    one-sample path is argmax(p / q) with q ~ Exp(1), without its input checks (reductions
    and host syncs, a large share of the per-pixel cost)."""
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1)


def guided_logits(cond_logits, uncond_logits, cfg, filter_threshold):
    """Classifier-free guidance on (N, V) logits. Where the conditional probability is
    below `filter_threshold`, the unconditional logit is first raised to at least the
    conditional one (both shifted to their row maximum), so guidance cannot make an
    implausible value likely."""
    if filter_threshold > 0:
        cond_probs = torch.softmax(cond_logits, dim=-1)
        floor = cond_logits - cond_logits.amax(dim=-1, keepdim=True) + uncond_logits.amax(dim=-1, keepdim=True)
        raised = torch.maximum(uncond_logits, floor)
        uncond_logits = torch.where(cond_probs < filter_threshold, raised, uncond_logits)
    return uncond_logits + cfg * (cond_logits - uncond_logits)
