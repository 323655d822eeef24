"""MAR generator: patches in random order with bidirectional attention (MAE/timm blocks)."""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn

from .ar import sample_patches, split_known
from .layers import Block, init_weights, patchify, run_blocks, unpatchify
from .pixelloss import PixelLoss

# (quirk) The guiding-pixel head of the official 256x256 models has this fixed shape.
GUIDING_HEAD = dict(width=128, depth=3, num_heads=4, r_weight=5.0)
MASK_RATIO_MEAN, MASK_RATIO_STD = 1.0, 0.25


class MAR(nn.Module):
    """Masked autoregressive generator over the patches of one level.

    Tokens fed to the transformer: [guiding pixel (optional), cond[num_conds-1], ...,
    cond[0], patch_0 .. patch_{L-1}], masked patches replaced by `mask_token`. Each
    patch's output and those of its four neighbours become the five conditions of the
    next level: [middle, top, right, bottom, left] (zeros across the border).
    """

    def __init__(self, seq_len, patch_size, cond_embed_dim, embed_dim, num_blocks, num_heads,
                 attn_dropout=0.1, proj_dropout=0.1, guiding_pixel=False, num_conds=1,
                 grad_checkpointing=False):
        super().__init__()
        self.seq_len = seq_len
        self.patch_size = patch_size
        self.grid_size = int(round(seq_len ** 0.5))
        self.num_conds = num_conds
        self.guiding_pixel = guiding_pixel
        self.grad_checkpointing = grad_checkpointing
        self.num_prefix = num_conds + int(guiding_pixel)
        # test seam: (orders (N, L), k) replacing the random masking, see `fixed_masking`
        self.fixed_masking = None

        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_emb = nn.Linear(3 * patch_size ** 2, embed_dim)
        self.patch_emb_ln = nn.LayerNorm(embed_dim, eps=1e-6)
        self.cond_emb = nn.Linear(cond_embed_dim, embed_dim)
        if guiding_pixel:
            self.pix_proj = nn.Linear(3, embed_dim)
        self.pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len + self.num_prefix, embed_dim))
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=4.0, attn_drop=attn_dropout, proj_drop=proj_dropout)
            for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        if guiding_pixel:
            self.guiding_pixel_loss = PixelLoss(c_channels=cond_embed_dim, **GUIDING_HEAD)

        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.pos_embed_learned, std=0.02)
        self.apply(init_weights)

    # ----------------------------------------------------------------- masking
    def choose_mask(self, batch, device):
        """(B, L) bool, True = masked (predicted by the next level).

        Training: per-sample random order and mask ratio ~ N(1, 0.25) truncated to [0, 1],
        ceil(L * ratio) masked. Eval: one count k ~ U{1..L} for the whole batch."""
        L = self.seq_len
        if self.fixed_masking is not None:
            orders, k = self.fixed_masking
            if orders.shape != (batch, L):
                raise ValueError(f"fixed masking orders have shape {tuple(orders.shape)}, "
                                 f"this level needs ({batch}, {L})")
            orders = orders.to(device=device, dtype=torch.long)
        else:
            orders = torch.rand(batch, L, device=device).argsort(dim=1)
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
    def predict(self, patches, mask, cond_list):
        """patches: (B, L, 3p^2), mask: (B, L) bool, cond_list: num_conds tensors (B, C)
        [+ guiding pixel (B, 3)]. Returns the patch outputs (B, L, D)."""
        x = self.patch_emb(patches)
        x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        prefix = [self.cond_emb(cond_list[i]) for i in reversed(range(self.num_conds))]
        if self.guiding_pixel:
            prefix.insert(0, self.pix_proj(cond_list[self.num_conds]))
        x = torch.cat([torch.stack(prefix, dim=1).to(x.dtype), x], dim=1)  # (B, P+L, D)
        x = self.patch_emb_ln(x + self.pos_embed_learned)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x)[:, self.num_prefix:]

    def neighbour_conditions(self, x):
        """x: (B, L, D) -> [middle, top, right, bottom, left], each (B, L, D)."""
        B, L, D = x.shape
        g = self.grid_size
        grid = x.reshape(B, g, g, D)
        zero_row = grid.new_zeros(B, 1, g, D)
        zero_col = grid.new_zeros(B, g, 1, D)
        top = torch.cat([zero_row, grid[:, :-1]], dim=1)
        bottom = torch.cat([grid[:, 1:], zero_row], dim=1)
        left = torch.cat([zero_col, grid[:, :, :-1]], dim=2)
        right = torch.cat([grid[:, :, 1:], zero_col], dim=2)
        return [x] + [t.reshape(B, L, D) for t in (top, right, bottom, left)]

    def forward(self, imgs, cond_list):
        """imgs: (B, 3, H, W); cond_list: conditions (B, C). Returns the masked patches
        (N, 3, p, p) in (sample, position) order, their five conditions (N, D) and the
        guiding-pixel loss (0 without a guiding pixel)."""
        patches = patchify(imgs, self.patch_size)  # (B, L, 3p^2)
        mask = self.choose_mask(patches.shape[0], imgs.device)
        cond_list = list(cond_list)
        if self.guiding_pixel:
            guiding = imgs.mean(dim=(-2, -1))  # (B, 3) mean colour of each input patch
            guiding_loss = self.guiding_pixel_loss(guiding, cond_list)
            cond_list.append(guiding)
        else:
            guiding_loss = imgs.new_zeros(())
        x = self.predict(patches, mask, cond_list)
        p = self.patch_size
        next_patches = patches[mask].reshape(-1, 3, p, p)
        return next_patches, [c[mask] for c in self.neighbour_conditions(x)], guiding_loss

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, cond_list, num_iter, cfg, cfg_schedule, temperature, filter_threshold,
               next_level_sample_function, visualize=False, known=None, known_mask=None):
        """Generate the patches in min(L, num_iter) steps, MaskGIT-style cosine schedule.

        cond_list: conditions (B, C), or (2B, C) when cfg != 1 (rows 0..B-1 conditional,
        B..2B-1 unconditional). known / known_mask: optional (B, 3, H, W) values and bools;
        fully known patches are visible from the start and never sampled, partly known
        ones recurse with their known pixels. Returns (B, 3, H, W) normalised images.
        """
        guided = cfg != 1.0
        B = cond_list[0].shape[0] // 2 if guided else cond_list[0].shape[0]
        L, p = self.seq_len, self.patch_size
        device = cond_list[0].device
        cond_list = list(cond_list)
        if self.guiding_pixel:
            guiding = self.guiding_pixel_loss.sample(cond_list, temperature, cfg, filter_threshold)
            cond_list.append(torch.cat([guiding, guiding]) if guided else guiding)

        # float32 whatever the autocast dtype: the values must survive the round trip to 0..255
        patches = torch.zeros(B, L, 3 * p * p, device=device)
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
            tokens, token_mask = patches, mask
            if guided:
                tokens, token_mask = torch.cat([patches, patches]), torch.cat([mask, mask])
            x = self.predict(tokens, token_mask, cond_list)  # (rows, L, D)

            masked_now = mask.sum(dim=1)
            target = (num_unknown * math.cos(math.pi / 2 * (step + 1) / num_steps)).floor().long()
            # keep at least one masked for the next step while any is left
            mask_len = torch.maximum(masked_now.clamp(max=1), torch.minimum(masked_now - 1, target))
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
            rows = torch.cat([to_predict, to_predict]) if guided else to_predict
            cond_next = [c[rows] for c in self.neighbour_conditions(x)]
            if to_predict.any():
                patches[to_predict] = sample_patches(
                    next_level_sample_function, cond_next, cfg_iter, temperature, filter_threshold,
                    p, known_patches, known_patch_mask, to_predict, guided)
            mask = mask_next
            if visualize:
                visualize(unpatchify(patches, p, self.grid_size), step + 1, num_steps)
        return unpatchify(patches, p, self.grid_size)


@contextmanager
def fixed_masking(model, tables):
    """Test seam: replace the random masking of MAR levels by stored orders.

    tables: {fractal_level: {"orders": (N, L) int tensor, "k": int}}; at that level the
    masked set of row r is orders[r, :k]. Restores random masking on exit.
    """
    levels = dict(enumerate(model.levels()))
    try:
        for level, table in tables.items():
            generator = levels[int(level)].generator
            if not isinstance(generator, MAR):
                raise ValueError(f"level {level} is not a MAR level")
            generator.fixed_masking = (torch.as_tensor(table["orders"]).long(), int(table["k"]))
        yield model
    finally:
        for level in levels.values():
            if isinstance(level.generator, MAR):
                level.generator.fixed_masking = None
