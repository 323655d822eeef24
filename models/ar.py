"""AR generator: patches in raster order with causal attention (LlamaGen-style blocks)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (KVCache, StaticKVCache, attend, dropout_in_training, init_weights, merge_heads, patchify,
                     run_blocks, static_caches, step_function, unpatchify)

# (quirk) The official AR blocks hard-code these, whatever the dropout flags say; the
# pretrained weights were trained with them.
AR_RESID_DROPOUT = 0.1
AR_FFN_DROPOUT = 0.1
ROPE_BASE = 10000.0
FUSE_PIXEL_STEPS = True  # fast sampling: each pixel draw and the next AR step as one graph


def find_multiple(n, k):
    return n if n % k == 0 else n + k - n % k


def rope_2d_table(grid_size, head_dim, num_prefix_tokens=1, base=ROPE_BASE):
    """Rotary table (num_prefix_tokens + grid_size**2, head_dim // 2, 2) of (cos, sin).

    The first half of each head rotates with the patch row, the second half with the
    column; frequency j is base^(-4j/head_dim). (quirk) The prefix (condition) rows are
    all zeros, not the identity rotation: the condition token's q and k become zero.
    """
    if head_dim % 4:
        raise ValueError(f"2-D rotary embedding needs a head size divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float32) * 4 / head_dim)  # (hd/4,)
    angles = torch.outer(torch.arange(grid_size, dtype=torch.float32), freqs)  # (g, hd/4)
    rows = angles[:, None, :].expand(grid_size, grid_size, quarter)
    cols = angles[None, :, :].expand(grid_size, grid_size, quarter)
    grid = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, 2 * quarter)
    table = torch.stack([grid.cos(), grid.sin()], dim=-1)  # (g*g, hd/2, 2)
    prefix = torch.zeros(num_prefix_tokens, 2 * quarter, 2)
    return torch.cat([prefix, table], dim=0)


def rope_factors(table, num_heads=1):
    """(T, hd/2, 2) table of (cos, sin) -> cos, sin, each (T, num_heads * hd), laid out for
    `apply_rope`: channel pair (2j, 2j+1) of every head gets (cos_j, cos_j) and (-sin_j, sin_j)."""
    cos, sin = table.unbind(-1)
    cos, sin = torch.stack([cos, cos], dim=-1).flatten(-2), torch.stack([-sin, sin], dim=-1).flatten(-2)
    return cos.repeat(1, num_heads), sin.repeat(1, num_heads)


def apply_rope(x, cos, sin):
    """x: (B, T, ..., nh*hd), heads side by side; cos, sin: (T, nh*hd) from `rope_factors`.
    Rotates each channel pair (x0, x1) = (2j, 2j+1) to (x0 cos - x1 sin, x1 cos + x0 sin),
    in float32.

    Written as x * cos + pair_swap(x) * sin over whole rows of heads: four vectorised
    tensor ops, and the very same floats (a + b * (-s) is a - b * s exactly)."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) in each pair
    shape = (1, cos.shape[0]) + (1,) * (x.dim() - 3) + (cos.shape[1],)
    return (xf * cos.view(shape) + swapped * sin.view(shape)).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # the same floats, fewer ops
        # normalised in float32 and cast back before the weight, as LlamaGen does
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class CausalRopeAttention(nn.Module):
    """Causal attention with 2-D rotary q/k (LlamaGen names: `wqkv`, `wo`, no biases)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(AR_RESID_DROPOUT)

    def forward(self, x, rope, cache=None):
        """x: (B, T, D); rope: (cos, sin) rows for these T positions (see `apply_rope`)."""
        B, T, D = x.shape
        heads = (B, T, self.num_heads, D // self.num_heads)
        qkv = self.wqkv(x).view(B, T, 3, D)
        qk = apply_rope(qkv[:, :, :2], *rope)  # (B, T, 2, D): q and k rotated together
        q, k = qk[:, :, 0].view(heads).transpose(1, 2), qk[:, :, 1].view(heads).transpose(1, 2)  # (B, nh, T, hd)
        v = qkv[:, :, 2].view(heads).transpose(1, 2)
        # attention-probability dropout is 0 in the official AR
        out = merge_heads(attend(q, k, v, causal=True, cache=cache))
        return dropout_in_training(self.resid_dropout, self.wo(out))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.ffn_dropout = nn.Dropout(AR_FFN_DROPOUT)

    def forward(self, x):
        return dropout_in_training(self.ffn_dropout, self.w2(F.silu(self.w1(x)) * self.w3(x)))


class ARBlock(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        hidden = find_multiple(int(2 * 4 * dim / 3), 256)
        self.attention = CausalRopeAttention(dim, num_heads)
        self.feed_forward = SwiGLU(dim, hidden)
        self.attention_norm = RMSNorm(dim)
        self.ffn_norm = RMSNorm(dim)

    def forward(self, x, rope, cache=None):
        x = x + self.attention(self.attention_norm(x), rope, cache=cache)
        return x + self.feed_forward(self.ffn_norm(x))


class AR(nn.Module):
    """Raster-order autoregressive generator over the patches of one level.

    Sequence: [cond_emb(cond_list[0]), patch_0, ..., patch_{L-1}]; the output at position i
    conditions patch i at the next level.
    """

    def __init__(self, seq_len, patch_size, cond_embed_dim, embed_dim, num_blocks, num_heads,
                 grad_checkpointing=False, in_channels=3, **unused_mar_options):
        super().__init__()
        self.seq_len = seq_len
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.grid_size = int(round(seq_len ** 0.5))
        self.grad_checkpointing = grad_checkpointing

        self.patch_emb = nn.Linear(in_channels * patch_size ** 2, embed_dim)
        self.patch_emb_ln = nn.LayerNorm(embed_dim, eps=1e-6)
        self.pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len + 1, embed_dim))
        self.cond_emb = nn.Linear(cond_embed_dim, embed_dim)
        self.blocks = nn.ModuleList([ARBlock(embed_dim, num_heads) for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        rope_cos, rope_sin = rope_factors(rope_2d_table(self.grid_size, embed_dim // num_heads), num_heads)
        self.register_buffer("rope_cos", rope_cos, persistent=False)  # (L+1, D)
        self.register_buffer("rope_sin", rope_sin, persistent=False)
        nn.init.normal_(self.pos_embed_learned, std=0.02)
        self.apply(init_weights)

    def embed(self, tokens, start):
        """tokens: (B, T, D) embeddings placed at positions start..start+T-1."""
        x = tokens + self.pos_embed_learned[:, start:start + tokens.shape[1]]
        return self.patch_emb_ln(x)

    def forward(self, imgs, cond_list):
        """imgs: (B, C, H, W); cond_list[0]: (B, D_cond).
        Returns patches (B*L, C, p, p), [conditions (B*L, D)] and a zero guiding loss."""
        patches = patchify(imgs, self.patch_size)  # (B, L, Cp^2)
        B, L, _ = patches.shape
        x = torch.cat([self.cond_emb(cond_list[0]).unsqueeze(1), self.patch_emb(patches)], dim=1)
        x = self.embed(x, 0)  # (B, L+1, D)
        x = run_blocks(self.blocks, x, self.grad_checkpointing, rope=(self.rope_cos, self.rope_sin))
        x = self.norm(x)[:, :L]  # output i conditions patch i
        next_patches = patches.reshape(B * L, self.in_channels, self.patch_size, self.patch_size)
        return next_patches, [x.reshape(B * L, -1)], x.new_zeros(())

    @torch.no_grad()
    def sample(self, cond_list, num_iter, cfg, cfg_schedule, temperature, filter_threshold,
               next_level_sample_function, visualize=False, known=None, known_mask=None, fast=False):
        """Generate L patches one at a time (num_iter is ignored: AR always takes L steps).

        cond_list[0]: (B, C), or (2B, C) when cfg != 1 (rows 0..B-1 conditional,
        B..2B-1 unconditional); both halves see the same generated patches. Each step
        feeds one token through the blocks thanks to a key/value cache.
        known / known_mask: optional (B, C, H, W) values and bools; fully known patches
        are taken as they are, partly known ones recurse with their known part.
        fast: False (the official random stream), True (static-shape decode steps under
        torch.compile), "frozen" (the same with the weights frozen into the graphs, CPU)
        or "eager" (the same steps uncompiled); conditional generation (known) always
        takes the official path.
        Returns (B, C, H, W) normalised images.
        """
        if fast and known is None:
            return self.sample_static(cond_list[0], cfg, cfg_schedule, temperature, filter_threshold,
                                      next_level_sample_function, visualize, fast)
        guided = cfg != 1.0
        cond = cond_list[0]
        B = cond.shape[0] // 2 if guided else cond.shape[0]
        p, L = self.patch_size, self.seq_len
        # float32 whatever the autocast dtype: the values must survive the round trip to 0..255
        patches = torch.zeros(B, L, self.in_channels * p * p, device=cond.device)
        known_patches, known_patch_mask = split_known(known, known_mask, p)
        caches = [KVCache(max_len=L + 1) for _ in self.blocks]
        x = self.cond_emb(cond).unsqueeze(1)  # (rows, 1, D): position 0 is the condition
        for step in range(L):
            rope = (self.rope_cos[step:step + 1], self.rope_sin[step:step + 1])
            h = run_blocks(self.blocks, self.embed(x, step), caches=caches, rope=rope)
            h = self.norm(h)[:, 0]  # (rows, D): condition for patch `step`
            if cfg_schedule == "linear":
                cfg_iter = 1 + (cfg - 1) * (step + 1) / L
            else:
                cfg_iter = cfg
            patches[:, step] = sample_patches(
                next_level_sample_function, [h], cfg_iter, temperature, filter_threshold, p,
                known_patches, known_patch_mask, (slice(None), step), guided)
            if visualize:
                visualize(unpatchify(patches, p, self.grid_size), step + 1, L)
            new_token = self.patch_emb(patches[:, step])
            x = torch.cat([new_token, new_token]) if guided else new_token
            x = x.unsqueeze(1)
        return unpatchify(patches, p, self.grid_size)

    # ----------------------------------------------------------------- static decoding
    def decode_tokens(self, tokens, pos, buffers):
        """tokens: (rows, T, D) embeddings at positions pos (T,) long; buffers: one (k, v)
        pair (rows, nh, L+1, hd) per block, written in place -> outputs (rows, T, D)."""
        rope = (self.rope_cos[pos], self.rope_sin[pos])  # (T, D) each
        x = self.patch_emb_ln(tokens + self.pos_embed_learned[:, pos])
        x = run_blocks(self.blocks, x, caches=static_caches(buffers, pos), rope=rope)
        return self.norm(x)

    def decode_patch(self, patch, pos, buffers, guided):
        """One decode step: the patch (B, Cp^2) generated at position pos - 1 goes in, the
        condition (rows, D) of the patch at position pos comes out."""
        token = self.patch_emb(patch).unsqueeze(1)  # (B, 1, D)
        if guided:  # both halves see the same patches
            token = torch.cat([token, token])
        return self.decode_tokens(token, pos, buffers)[:, 0]

    def draw_and_decode(self, head, h, pos, buffers, temperature, cfg, filter_threshold, guided):
        """The pixel `head` draws the pixels of the conditions h (rows, D), which go straight
        into the decode step at position pos: -> pixels (B, C) and the conditions of the next
        pixels (rows, D). One graph per pixel instead of two (the per-call overhead of a
        compiled step is as large as the step itself at batch 1)."""
        pixels = head.draw_pixels(h, temperature, cfg, filter_threshold, guided)
        return pixels, self.decode_patch(pixels, pos, buffers, guided)

    def sample_static(self, cond, cfg, cfg_schedule, temperature, filter_threshold, next_level,
                      visualize, fast):
        """`sample` without known pixels, as fixed-shape steps (see StaticKVCache): the
        condition token is one step, every patch another, each a candidate for one
        compiled graph. Right above the pixel head (`next_level.pixel_head`, patches of
        one pixel) each draw is fused with the next decode step. cond: (rows, C).
        Returns (B, C, H, W)."""
        guided = cfg != 1.0
        B = cond.shape[0] // 2 if guided else cond.shape[0]
        p, L = self.patch_size, self.seq_len
        patches = torch.zeros(B, L, self.in_channels * p * p, device=cond.device)
        positions = torch.arange(L + 1, device=cond.device)
        x = self.cond_emb(cond).unsqueeze(1)  # (rows, 1, D)
        attention = self.blocks[0].attention
        buffers = StaticKVCache.buffers(x.shape[0], attention.num_heads, L + 1, x.shape[-1] // attention.num_heads,
                                        x, len(self.blocks))
        rows = x.shape[0]
        prefill = step_function(AR.decode_tokens, fast, device=cond.device, rows=rows)
        head = getattr(next_level, "pixel_head", None) if FUSE_PIXEL_STEPS else None
        if head is None:
            step = step_function(AR.decode_patch, fast, device=cond.device, rows=rows)
        else:
            fused = step_function(AR.draw_and_decode, fast, device=cond.device, rows=rows)
            # tensors, not floats: a float argument would be a constant of the compiled graph
            temperature_t = torch.tensor(float(temperature), device=cond.device)
        h = prefill(self, x, positions[:1], buffers)[:, 0]
        for i in range(L):
            cfg_iter = 1 + (cfg - 1) * (i + 1) / L if cfg_schedule == "linear" else cfg
            if head is not None and i < L - 1:  # draw pixel i, then condition pixel i + 1
                out, h = fused(self, head, h, positions[i + 1:i + 2], buffers, temperature_t,
                               torch.tensor(float(cfg_iter), device=cond.device), filter_threshold, guided)
            else:
                if i > 0 and head is None:
                    h = step(self, patches[:, i - 1], positions[i:i + 1], buffers, guided)
                out = next_level(cond_list=[h], cfg=cfg_iter, temperature=temperature,
                                 filter_threshold=filter_threshold)
            patches[:, i] = out.reshape(B, -1)
            if visualize:
                visualize(unpatchify(patches, p, self.grid_size), i + 1, L)
        return unpatchify(patches, p, self.grid_size)


def split_known(known, known_mask, patch_size):
    """Patchify optional known values/mask: -> (B, L, Cp^2) each, or (None, None)."""
    if known is None:
        return None, None
    mask = known_mask.expand_as(known).to(known.dtype)
    return patchify(known, patch_size), patchify(mask, patch_size).bool()


def sample_patches(next_level, cond_list, cfg, temperature, filter_threshold, patch_size,
                   known_patches, known_patch_mask, index, guided):
    """Sample the patches at `index` of the (B, L, Cp^2) patch grid with the next level.

    cond_list holds the rows for exactly those patches (conditional rows first, then the
    unconditional twins when `guided`). Fully known patches are copied instead of sampled;
    partly known ones pass their known pixels down. Returns (N, Cp^2).
    """
    p = patch_size
    if known_patches is None:
        out = next_level(cond_list=cond_list, cfg=cfg, temperature=temperature,
                         filter_threshold=filter_threshold)
        return out.reshape(out.shape[0], -1)
    values = known_patches[index]  # (N, Cp^2)
    mask = known_patch_mask[index]
    todo = ~mask.all(dim=-1)  # patches with something left to generate
    out = values.clone()
    if todo.any():
        rows = torch.cat([todo, todo]) if guided else todo
        sub = next_level(cond_list=[c[rows] for c in cond_list], cfg=cfg, temperature=temperature,
                         filter_threshold=filter_threshold,
                         known=values[todo].reshape(-1, values.shape[-1] // (p * p), p, p),
                         known_mask=mask[todo].reshape(-1, values.shape[-1] // (p * p), p, p))
        out[todo] = sub.reshape(sub.shape[0], -1).to(out.dtype)
    return out
