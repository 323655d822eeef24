"""MAR generator: patches in random order with bidirectional attention (MAE/timm blocks)."""
import functools
import math
from contextlib import contextmanager

import torch
import torch.nn as nn

from .ar import sample_patches, split_known
from .layers import Block, init_weights, pad_halves, patchify, run_blocks, step_function, unpad_halves, unpatchify
from .pixelloss import PixelLoss, bucket_size

# (quirk) The guiding-pixel head of the official 256x256 models has this fixed shape.
GUIDING_HEAD = dict(width=128, depth=3, num_heads=4, r_weight=5.0)
MASK_RATIO_MEAN, MASK_RATIO_STD = 1.0, 0.25
NUM_NEIGHBOUR_CONDS = 5  # middle, top, right, bottom, left


class MAR(nn.Module):
    """Masked autoregressive generator over the patches of one level.

    Tokens fed to the transformer: [guiding pixel (optional), cond[num_conds-1], ...,
    cond[0], patch_0 .. patch_{L-1}], masked patches replaced by `mask_token`. Each
    patch's output and those of its four neighbours become the five conditions of the
    next level: [middle, top, right, bottom, left] (zeros across the border).
    """

    def __init__(self, seq_len, patch_size, cond_embed_dim, embed_dim, num_blocks, num_heads,
                 attn_dropout=0.1, proj_dropout=0.1, guiding_pixel=False, num_conds=1,
                 grad_checkpointing=False, in_channels=3, pixel_mean=None, pixel_std=None):
        super().__init__()
        self.seq_len = seq_len
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.grid_size = int(round(seq_len ** 0.5))
        self.num_conds = num_conds
        self.guiding_pixel = guiding_pixel
        self.grad_checkpointing = grad_checkpointing
        self.num_prefix = num_conds + int(guiding_pixel)
        # how many of the five conditions the next level reads (FractalGen sets it: the
        # pixel head and AR levels read the middle one only); the others are not computed
        self.num_next_conds = NUM_NEIGHBOUR_CONDS
        # test seam: (orders (N, L), k) replacing the random masking, see `fixed_masking`
        self.fixed_masking = None

        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_emb = nn.Linear(in_channels * patch_size ** 2, embed_dim)
        self.patch_emb_ln = nn.LayerNorm(embed_dim, eps=1e-6)
        self.cond_emb = nn.Linear(cond_embed_dim, embed_dim)
        if guiding_pixel:
            self.pix_proj = nn.Linear(in_channels, embed_dim)
        self.pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len + self.num_prefix, embed_dim))
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=4.0, attn_drop=attn_dropout, proj_drop=proj_dropout)
            for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        if guiding_pixel:
            self.guiding_pixel_loss = PixelLoss(c_channels=cond_embed_dim, in_channels=in_channels,
                                                pixel_mean=pixel_mean, pixel_std=pixel_std, **GUIDING_HEAD)

        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.pos_embed_learned, std=0.02)
        self.apply(init_weights)

    # ----------------------------------------------------------------- masking
    def choose_mask(self, batch, device):
        """(B, L) bool, True = masked (predicted by the next level).

        Training: per-sample random order and mask ratio ~ N(1, 0.25) truncated to [0, 1],
        ceil(L * ratio) masked. Eval: one count k ~ U{1..L} for the whole batch."""
        L = self.seq_len
        orders = k = None
        if self.fixed_masking is not None:
            orders, k = self.fixed_masking
        if orders is not None:
            if orders.shape != (batch, L):
                raise ValueError(f"fixed masking orders have shape {tuple(orders.shape)}, "
                                 f"this level needs ({batch}, {L})")
            orders = orders.to(device=device, dtype=torch.long)
        else:
            orders = torch.rand(batch, L, device=device).argsort(dim=1)
        if k is None:
            if self.training:
                ratio = torch.empty(batch, device=device)
                nn.init.trunc_normal_(ratio, MASK_RATIO_MEAN, MASK_RATIO_STD, 0.0, 1.0)
                # ratio == 0 has probability zero; the clamp only guards an empty level
                k = (ratio * L).ceil().clamp(min=1).unsqueeze(1)  # (B, 1)
            else:
                k = torch.randint(1, L + 1, (), device=device)
        ranks = orders.argsort(dim=1)  # position of each patch in its order
        return ranks < k

    # ----------------------------------------------------------------- network
    def predict(self, patches, mask, cond_list, keep=None):
        """patches: (B, L, Cp^2), mask: (B, L) bool, cond_list: num_conds tensors (B, D_cond)
        [+ guiding pixel (B, C)]; keep: optional (B, K) patch positions whose outputs are
        wanted (default: all L, in order). Returns their outputs (B, K, D).

        Every token is attended to, but the last block computes outputs for the kept
        patches only: the condition tokens' and the other patches' outputs are never read."""
        B, L = mask.shape
        if keep is None:
            keep = torch.arange(L, device=mask.device).expand(B, L)
        x = self.patch_emb(patches)
        x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        prefix = [self.cond_emb(cond_list[i]) for i in reversed(range(self.num_conds))]
        if self.guiding_pixel:
            prefix.insert(0, self.pix_proj(cond_list[self.num_conds]))
        x = torch.cat([torch.stack(prefix, dim=1).to(x.dtype), x], dim=1)  # (B, P+L, D)
        x = self.patch_emb_ln(x + self.pos_embed_learned)
        x = run_blocks(self.blocks[:-1], x, self.grad_checkpointing)
        x = run_blocks(self.blocks[-1:], x, self.grad_checkpointing, keep=keep + self.num_prefix)
        return self.norm(x)

    def next_conditions(self, x, keep, rows, count=None):
        """Conditions of the patches handed to the next level.

        x: (B, K, D) outputs at the positions keep (B, K), which must include every patch
        of rows and, when the next level reads more than the middle condition, their
        neighbours; rows: (B, L) bool. Returns the first `count` (default num_next_conds)
        of [middle, top, right, bottom, left], each (N, D) with N = rows.sum() in
        (sample, position) order; a neighbour across the image border is zero.
        """
        B, K, D = x.shape
        g, w = self.grid_size, self.grid_size + 2
        # the outputs on a zero-bordered w x w grid, so that border neighbours read zeros
        slots = (keep // g + 1) * w + keep % g + 1  # (B, K)
        grid = x.new_zeros(B, w * w, D).scatter(1, slots.unsqueeze(-1).expand(-1, -1, D), x)
        if rows is None:  # the grid alone (see `sample_static`)
            return grid
        b, pos = rows.nonzero(as_tuple=True)  # (N,) each
        return self.conditions_at(grid, b, pos, count)

    def conditions_at(self, grid, b, pos, count=None):
        """The first `count` conditions of the patches (b, pos), (N,) each, read from the
        zero-bordered (B, w*w, D) grid of outputs built by `next_conditions`."""
        B, _, D = grid.shape
        g, w = self.grid_size, self.grid_size + 2
        centre = b * w * w + (pos // g + 1) * w + pos % g + 1
        offsets = (0, -w, 1, w, -1)[:count or self.num_next_conds]  # middle, top, right, bottom, left
        flat = grid.view(B * w * w, D)
        return [flat[centre + offset] for offset in offsets]

    def forward(self, imgs, cond_list):
        """imgs: (B, C, H, W); cond_list: conditions (B, D_cond). Returns the masked patches
        (N, C, p, p) in (sample, position) order, their five conditions (N, D) and the
        guiding-pixel loss (0 without a guiding pixel)."""
        patches = patchify(imgs, self.patch_size)  # (B, L, Cp^2)
        mask = self.choose_mask(patches.shape[0], imgs.device)
        cond_list = list(cond_list)
        if self.guiding_pixel:
            guiding = imgs.mean(dim=(-2, -1))  # (B, C) mean colour of each input patch
            guiding_loss = self.guiding_pixel_loss(guiding, cond_list)
            cond_list.append(guiding)
        else:
            guiding_loss = imgs.new_zeros(())
        keep = needed_positions(mask, self.grid_size, self.num_next_conds > 1)
        x = self.predict(patches, mask, cond_list, keep)  # (B, K, D)
        p = self.patch_size
        next_patches = patches[mask].reshape(-1, self.in_channels, p, p)
        return next_patches, self.next_conditions(x, keep, mask), guiding_loss

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, cond_list, num_iter, cfg, cfg_schedule, temperature, filter_threshold,
               next_level_sample_function, visualize=False, known=None, known_mask=None, fast=False):
        """Generate the patches in min(L, num_iter) steps, MaskGIT-style cosine schedule.

        cond_list: conditions (B, C), or (2B, C) when cfg != 1 (rows 0..B-1 conditional,
        B..2B-1 unconditional). known / known_mask: optional (B, C, H, W) values and bools;
        fully known patches are visible from the start and never sampled, partly known
        ones recurse with their known pixels. fast: see AR.sample.
        Returns (B, C, H, W) normalised images.
        """
        if fast and known is None:
            return self.sample_static(cond_list, num_iter, cfg, cfg_schedule, temperature, filter_threshold,
                                      next_level_sample_function, visualize, fast)
        guided = cfg != 1.0
        B = cond_list[0].shape[0] // 2 if guided else cond_list[0].shape[0]
        L, p = self.seq_len, self.patch_size
        device = cond_list[0].device
        cond_list = list(cond_list)
        if self.guiding_pixel:
            guiding = self.guiding_pixel_loss.sample(cond_list, temperature, cfg, filter_threshold)
            cond_list.append(torch.cat([guiding, guiding]) if guided else guiding)

        # float32 whatever the autocast dtype: the values must survive the round trip to 0..255
        patches = torch.zeros(B, L, self.in_channels * p * p, device=device)
        known_patches, known_patch_mask = split_known(known, known_mask, p)
        if known_patches is None:
            fully_known = torch.zeros(B, L, dtype=torch.bool, device=device)
        else:
            fully_known = known_patch_mask.all(dim=-1)
            patches[fully_known] = known_patches[fully_known]
        mask = ~fully_known
        num_unknown = mask.sum(dim=1)  # (B,)
        # random order over the unknown patches; known ones go last so they are never masked
        orders = (torch.rand(B, L, device=device) + fully_known.float()).argsort(dim=1)
        ranks = orders.argsort(dim=1)

        num_steps = min(L, num_iter)
        for step in range(num_steps):
            mask_len = cosine_mask_len(num_unknown, mask.sum(dim=1), step, num_steps)
            if step == num_steps - 1:
                mask_next = torch.zeros_like(mask)
            else:
                mask_next = (ranks < mask_len.unsqueeze(1)) & mask
            to_predict = mask & ~mask_next  # (B, L)

            if cfg_schedule == "linear":
                # (quirk) uses the clamped mask_len, so the last step is not at full cfg
                progress = 1 - mask_len.sum().item() / max(num_unknown.sum().item(), 1)
                cfg_iter = 1 + (cfg - 1) * progress
            else:
                cfg_iter = cfg
            keep = needed_positions(to_predict, self.grid_size, self.num_next_conds > 1)
            tokens, token_mask, rows = patches, mask, to_predict
            if guided:  # both halves see the same patches
                tokens, token_mask, rows, keep = (torch.cat([t, t]) for t in (patches, mask, to_predict, keep))
            x = self.predict(tokens, token_mask, cond_list, keep)  # (rows, K, D)
            cond_next = self.next_conditions(x, keep, rows)
            if to_predict.any():
                patches[to_predict] = sample_patches(
                    next_level_sample_function, cond_next, cfg_iter, temperature, filter_threshold,
                    p, known_patches, known_patch_mask, to_predict, guided)
            mask = mask_next
            if visualize:
                visualize(unpatchify(patches, p, self.grid_size), step + 1, num_steps)
        return unpatchify(patches, p, self.grid_size)

    def sample_static(self, cond_list, num_iter, cfg, cfg_schedule, temperature, filter_threshold,
                      next_level, visualize, fast):
        """`sample` without known pixels and without host syncs: every row then predicts
        the same number of patches per step, known ahead from the schedule, so each step
        has fixed shapes -- the rows (padded to a power of two, see `bucket_size`) and the
        kept positions (a power of two). Patches are generated in the order of a random
        permutation, as in `sample`; the transformer (`predict`) is the compiled part,
        with dynamic shapes (see `step_function`)."""
        guided = cfg != 1.0
        halves = 1 + guided
        B = cond_list[0].shape[0] // halves
        L, p = self.seq_len, self.patch_size
        device = cond_list[0].device
        cond_list = list(cond_list)
        if self.guiding_pixel:
            guiding = self.guiding_pixel_loss.sample(cond_list, temperature, cfg, filter_threshold, fast=fast)
            cond_list.append(torch.cat([guiding, guiding]) if guided else guiding)
        size = bucket_size(B)
        cond_list = [pad_halves(c, halves, size) for c in cond_list]  # (halves * size, C)
        patches = torch.zeros(size, L, self.in_channels * p * p, device=device)
        orders = torch.rand(size, L, device=device).argsort(dim=1)
        ranks = orders.argsort(dim=1)
        batch = torch.arange(halves * size, device=device).unsqueeze(1)  # (rows, 1)
        predict = step_function(MAR.predict, fast, dynamic=True, device=device)
        done = 0  # patches generated so far, the same count in every row
        schedule = static_schedule(L, min(L, num_iter))
        for step, (mask_len, count) in enumerate(schedule):
            positions = orders[:, done:done + count]  # (size, count) the patches of this step
            keep = self.static_keep(positions, ranks, done, count)
            tokens, token_mask = patches, ranks >= done
            if guided:  # both halves see the same patches
                tokens, token_mask, keep, positions = (torch.cat([t, t]) for t in (tokens, token_mask, keep, positions))
            x = predict(self, tokens, token_mask, cond_list, keep)  # (rows, K, D)
            grid = self.next_conditions(x, keep, None)
            cond_next = self.conditions_at(grid, batch.expand(-1, count).reshape(-1), positions.reshape(-1))
            cond_next = [unpad_halves(c, halves, size, B * count) for c in cond_next]
            cfg_iter = 1 + (cfg - 1) * (1 - mask_len / L) if cfg_schedule == "linear" else cfg
            out = next_level(cond_list=cond_next, cfg=cfg_iter, temperature=temperature,
                             filter_threshold=filter_threshold)  # (B * count, C, p, p)
            new = positions[:size].unsqueeze(-1).expand(-1, -1, self.in_channels * p * p)
            patches[:B].scatter_(1, new[:B], out.reshape(B, count, -1).to(patches.dtype))
            done += count
            if visualize:
                visualize(unpatchify(patches[:B], p, self.grid_size), step + 1, len(schedule))
        return unpatchify(patches[:B], p, self.grid_size)

    def static_keep(self, positions, ranks, done, count):
        """Kept positions of a static step: the patches of this step (and their neighbours
        when the next level reads them) first, padded to a power-of-two count known on
        the host (an upper bound of what is needed)."""
        neighbours = self.num_next_conds > 1
        rows = ranks.new_zeros(ranks.shape, dtype=torch.bool).scatter_(1, positions, True)
        bound = count * (NUM_NEIGHBOUR_CONDS if neighbours else 1)
        return needed_positions(rows, self.grid_size, neighbours, k=bucket_size(bound))


def cosine_mask_len(num_unknown, masked_now, step, num_steps):
    """Patches left masked after `step` of the cosine schedule (at least one while any is
    left); tensors of any shape, float32 arithmetic as in the official code."""
    target = (num_unknown * math.cos(math.pi / 2 * (step + 1) / num_steps)).floor().long()
    return torch.maximum(masked_now.clamp(max=1), torch.minimum(masked_now - 1, target))


@functools.lru_cache(maxsize=None)
def static_schedule(seq_len, num_steps):
    """[(mask_len, count)] per step when every patch starts unknown: the (clamped) mask
    length the linear cfg schedule reads, and how many patches the step generates.
    Computed on the CPU before sampling (once per shape), so the loop needs no host sync."""
    L = torch.tensor(seq_len)
    masked, schedule = seq_len, []
    for step in range(num_steps):
        mask_len = int(cosine_mask_len(L, torch.tensor(masked), step, num_steps))
        after = 0 if step == num_steps - 1 else mask_len
        schedule.append((mask_len, masked - after))
        masked = after
    return schedule


# The last block skips the patches whose outputs the next level does not read. The kept
# count is padded to a multiple of KEEP_MULTIPLE: at such row counts the CPU matmul and
# attention kernels compute every row exactly as in the full pass (1-3 leftover rows take
# code paths that round differently), so skipping changes no sampled value;
# tests/test_benchmark.py checks this against the full pass.
KEEP_MULTIPLE = 4


def needed_positions(rows, grid_size, neighbours, k=None):
    """rows: (B, L) bool of the patches handed to the next level -> (B, K) positions whose
    outputs are needed: those patches (and their four neighbours if `neighbours`) first,
    padded with others to a common K; all L when that is (nearly) all. k: a K known to
    suffice (no host sync), instead of counting."""
    B, L = rows.shape
    need = rows
    if neighbours:
        grid = rows.view(B, grid_size, grid_size)
        need = grid.clone()
        need[:, :-1] |= grid[:, 1:]  # the patch above a handed-down one is its "top" condition
        need[:, 1:] |= grid[:, :-1]
        need[:, :, :-1] |= grid[:, :, 1:]
        need[:, :, 1:] |= grid[:, :, :-1]
        need = need.view(B, L)
    if k is None:
        k = -(-int(need.sum(dim=1).max()) // KEEP_MULTIPLE) * KEEP_MULTIPLE
    if k >= L:
        return torch.arange(L, device=rows.device).expand(B, L)
    return torch.sort((~need).to(torch.uint8), dim=1, stable=True).indices[:, :max(k, KEEP_MULTIPLE)]


@contextmanager
def fixed_masking(model, tables):
    """Test seam: replace the random masking of MAR levels by stored orders.

    tables: {fractal_level: {"orders": (N, L) int tensor or None, "k": int}}; at that
    level the masked set of row r is orders[r, :k]; with orders None the orders stay
    random and only the count is fixed (the benchmark times eval at chosen counts).
    Restores random masking on exit.
    """
    levels = dict(enumerate(model.levels()))
    try:
        for level, table in tables.items():
            generator = levels[int(level)].generator
            if not isinstance(generator, MAR):
                raise ValueError(f"level {level} is not a MAR level")
            orders = table.get("orders")
            orders = None if orders is None else torch.as_tensor(orders).long()
            generator.fixed_masking = (orders, int(table["k"]))
        yield model
    finally:
        for level in levels.values():
            if isinstance(level.generator, MAR):
                level.generator.fixed_masking = None
