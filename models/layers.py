"""Transformer pieces shared by the AR and MAR generators and the pixel head.

One attention kernel (`attend`, PyTorch SDPA with an optional key/value cache), one
timm-style block (used bidirectionally by MAR and causally by the pixel head), one
weight init and one patchify live here. The MLP is timm's; timm's Attention and Block
lack what sampling needs (a key/value cache, queries for a subset of tokens), so those
are ours, with timm's parameter names. The AR generator's LlamaGen block differs for
real (RMSNorm, SwiGLU, rotary embedding) and lives in `ar.py`, but calls `attend` too.
"""
import functools
import itertools
import warnings
import weakref

import timm.layers
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ImageNet statistics: RGB pixel tensors are normalised with them (SPEC; the official
# checkpoints depend on them).
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)
# Every other channel (grey, alpha, channels beyond four) is normalised with this mean and
# std, which maps the values 0..255 to [-1, 1]. A model's record stores the constants it was
# built with (pixel_mean, pixel_std), so changing these would not change a trained model.
OTHER_MEAN, OTHER_STD = 0.5, 0.5
RGB_CHANNELS = (3, 4)  # RGB and RGBA: the first three channels are colour


def pixel_norm(in_channels):
    """The default (mean, std) per channel for `in_channels` channels: ImageNet's for the
    colour channels of RGB and RGBA, OTHER_MEAN / OTHER_STD for grey, alpha and the rest."""
    colour = 3 if in_channels in RGB_CHANNELS else 0
    rest = in_channels - colour
    return PIXEL_MEAN[:colour] + (OTHER_MEAN,) * rest, PIXEL_STD[:colour] + (OTHER_STD,) * rest


def patchify(imgs, patch_size):
    """(B, C, H, W) -> (B, (H/p)*(W/p), C*p*p); patches in raster order, each token laid
    out as (channel, row, column)."""
    B, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = torch.einsum("bchpwq->bhwcpq", x)  # (B, h, w, C, p, p)
    return x.reshape(B, h * w, C * p * p)


def unpatchify(tokens, patch_size, grid_size):
    """(B, h*w, C*p*p) -> (B, C, h*p, w*p); the inverse of `patchify` for a square grid."""
    B = tokens.shape[0]
    p, h = patch_size, grid_size
    C = tokens.shape[-1] // (p * p)
    x = tokens.reshape(B, h, h, C, p, p)
    x = torch.einsum("bhwcpq->bchpwq", x)  # (B, C, h, p, w, p)
    return x.reshape(B, C, h * p, h * p)


def init_weights(module):
    """Xavier-uniform Linear weights with zero bias; LayerNorm to identity."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class KVCache:
    """Keys and values of one attention layer, grown one step at a time while sampling.

    Sampling-time state only: the sampler creates one per layer and drops it afterwards,
    so nothing is left on the module.
    """

    def __init__(self, max_len):
        self.max_len = max_len
        self.length = 0
        self.k = self.v = None

    def append(self, k, v):
        """k, v: (B, nh, T, hd) for the new tokens -> all keys and values so far."""
        T = k.shape[2]
        if self.k is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k = k.new_empty(shape)
            self.v = v.new_empty(shape)
        if self.length + T > self.max_len:
            raise RuntimeError(f"KV cache overflow: {self.length + T} tokens > {self.max_len}")
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


class StaticKVCache:
    """Keys and values of one attention layer in buffers as long as the whole sequence,
    written in place at the positions `pos` (a (T,) long tensor) of the new tokens.

    Every decode step then has the same shapes and no host sync, which is what
    torch.compile (and CUDA graphs) need: attention runs over the full buffer with a mask
    of the positions written so far. The buffers start as zeros so the masked slots hold
    finite values. Sampling-time state, like KVCache.
    """

    def __init__(self, k, v, pos):
        self.k, self.v, self.pos = k, v, pos  # (B, nh, S, hd) each; (T,)

    @staticmethod
    def buffers(rows, num_heads, max_len, head_dim, like, count):
        """`count` pairs of zero (k, v) buffers (rows, nh, max_len, hd) with the dtype and
        device of `like`."""
        shape = (rows, num_heads, max_len, head_dim)
        return [(like.new_zeros(shape), like.new_zeros(shape)) for _ in range(count)]

    def append(self, k, v):
        """k, v: (B, nh, T, hd) at positions pos -> the buffers and the (T, S) bool mask of
        the keys each new token sees (those at or before its position)."""
        self.k.index_copy_(2, self.pos, k.to(self.k.dtype))
        self.v.index_copy_(2, self.pos, v.to(self.v.dtype))
        visible = torch.arange(self.k.shape[2], device=k.device) <= self.pos.unsqueeze(1)  # (T, S)
        return self.k, self.v, visible


def static_caches(buffers, pos):
    """One StaticKVCache per (k, v) pair of `buffers`, all at positions `pos`."""
    return [StaticKVCache(k, v, pos) for k, v in buffers]


def pad_halves(x, halves, size):
    """(halves * n, C) -> (halves * size, C), each half padded with zero rows."""
    n = x.shape[0] // halves
    if n == size:
        return x
    padded = x.new_zeros(halves, size, x.shape[-1])
    padded[:, :n] = x.view(halves, n, -1)
    return padded.view(halves * size, -1)


def unpad_halves(x, halves, size, n):
    """(halves * size, C) rows ordered (half, row) -> the first n rows of each half."""
    if n == x.shape[0] // halves:
        return x
    return x.view(halves, -1, x.shape[-1])[:, :n].reshape(halves * n, -1)


# Inductor settings of the compiled decode steps on the CPU with fast="frozen". A step
# multiplies a handful of rows by each weight matrix, where a library GEMM call costs more
# than its arithmetic. With the weights frozen into the graph (constants, prepacked once)
# inductor writes its own C++ micro-GEMMs instead, fused with their neighbours: the pixel-head
# draw and the AR decode step of bench64ar run 2-2.5x faster than with library calls (AMD
# EPYC, fp32). The C++ wrapper (cpp_wrapper) then saves the Python calls between a graph's
# ~40 kernels. Only the C++ GEMM backend is offered: up to FROZEN_MAX_ROWS rows it won every
# autotuning against MKL (bench64ar, batch 4), and autotuning would compile and time each
# candidate (~4 s per matmul here). Above that MKL wins, so bigger steps are not frozen.
CPU_STEP_OPTIONS = {"max_autotune_gemm": True, "max_autotune_gemm_backends": "CPP", "cpp_wrapper": True}
FROZEN_MAX_ROWS = 64
FROZEN_STEPS = []  # the step functions compiled with frozen weights
_weights_seen = weakref.WeakKeyDictionary()  # model -> weights_stamp its frozen graphs were built from


def step_function(fn, fast, dynamic=False, device=None, rows=None):
    """The decode step `fn` as it is (fast == "eager"), or compiled (fast is True or
    "frozen").

    Compiled once per function and kept: dynamo caches the graphs per code object and
    guards on the module each call passes, so every level (and batch size) gets its own
    graph, built on first use. Shapes are static by default: the callers bucket row
    counts. dynamic=True compiles one graph for every bucket instead (MAR levels, whose
    steps have several kept-position counts: fewer compilations on the CPU; CUDA graphs
    would want the static buckets).

    fast=True reads the weights as graph inputs; inductor keeps the compiled code on disk
    (TORCHINDUCTOR_CACHE_DIR, by default /tmp/torchinductor_$USER), so a new process skips
    most of the compile time. fast="frozen" freezes the weights into the graphs instead
    (CPU_STEP_OPTIONS) where that pays: on the CPU (`device`), static shapes and at most
    FROZEN_MAX_ROWS matmul `rows`; elsewhere it is fast=True. Frozen steps are faster, but
    torch 2.14 cannot store them on disk ("mkldnn tensors unpickleable"), so every
    process compiles them anew; each graph holds a packed copy of its level's weights,
    and `forget_stale_steps` must run when weights may have changed."""
    check_fast(fast)
    if fast == "eager":
        return fn
    frozen = (fast == "frozen" and torch.device(device or "cpu").type == "cpu" and not dynamic
              and rows is not None and rows <= FROZEN_MAX_ROWS)
    return _compiled(fn, dynamic, frozen)


def check_fast(fast):
    if fast is not True and fast is not False and fast not in ("eager", "frozen"):
        raise ValueError(f"fast must be False, True, 'frozen' or 'eager', got {fast!r}")


@functools.lru_cache(maxsize=None)
def _compiled(fn, dynamic, frozen):
    # one graph per level, batch size and bucket: more than dynamo's default of 8 per function
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if not frozen:
        return torch.compile(fn, dynamic=dynamic)
    compiled = torch.compile(fn, dynamic=dynamic, options=CPU_STEP_OPTIONS)
    plain = _compiled(fn, dynamic, False)
    FROZEN_STEPS.append(fn)
    failed = []

    @functools.wraps(fn)
    def run_frozen(*args, **kwargs):
        if failed:
            return plain(*args, **kwargs)
        # dynamo reads the global flag while tracing (parameters become graph constants); an
        # options entry would reach inductor only. Set per call, so other compiled code
        # of the process keeps its parameters as inputs.
        config = torch._inductor.config
        before, config.freezing = config.freezing, True
        try:
            return compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 -- retried below; a real error raises there again
            error = e
        finally:
            config.freezing = before
        # Inductor's C++ GEMM has limits of its own (NoValidChoicesError): the step then runs
        # with the weights as inputs. Retrying is safe: a step only rewrites the cache
        # positions it is given.
        out = plain(*args, **kwargs)
        failed.append(error)
        warnings.warn(f"fast='frozen': {fn.__qualname__} could not be compiled with frozen weights "
                      f"({type(error).__name__}: {first_line(error)}); it runs as with fast=True")
        return out
    return run_frozen


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def weights_stamp(module):
    """Where the parameters and buffers of `module` live and their in-place version
    counters: changes whenever an optimizer step, load_state_dict, .to() or an in-place
    edit touches a weight."""
    return tuple((t.data_ptr(), t._version) for t in itertools.chain(module.parameters(), module.buffers()))


def forget_stale_steps(model):
    """Drop every frozen step graph when the weights of `model` changed since its graphs
    were built (the graphs hold copies): the next steps recompile from the current
    weights (frozen graphs are not on disk, so this costs a full compile). Called once
    per sampling call."""
    stamp = weights_stamp(model)
    seen = _weights_seen.get(model)
    if seen is not None and seen != stamp:
        for fn in FROZEN_STEPS:
            torch._dynamo.eval_frame.remove_from_cache(fn)
    _weights_seen[model] = stamp


def merge_heads(x):
    """(B, nh, T, hd) -> (B, T, nh*hd)"""
    B, nh, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, nh * hd)


def dropout_in_training(dropout, x):
    """dropout(x) in training; in eval, where dropout is the identity, the module call is
    skipped: sampling runs the blocks once per token, and each call costs microseconds."""
    return dropout(x) if dropout.training else x


def take_rows(x, index):
    """x: (B, T, D), index: (B, K) long -> (B, K, D) with row b, k = x[b, index[b, k]]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# On CPU, SDPA's flash kernel has a per-sequence overhead that dominates for short
# sequences, such as the pixel head's 3 tokens (one sequence per pixel handed down) and the
# deep levels' 17-21: plain matmuls are faster up to these lengths, measured in paired A/B
# runs (training: +4 to +9% images/s; NLL evaluation: +3 to +8%). With a backward pass,
# flash wins again above ~8 tokens.
SHORT_SEQUENCE = 32
SHORT_SEQUENCE_WITH_GRAD = 8


def attend(q, k, v, causal=False, dropout_p=0.0, cache=None):
    """Scaled dot-product attention over (B, nh, T, hd) tensors, scale 1/sqrt(hd).

    With a cache, k and v of the new tokens are appended first. A causal cached call is
    either a prefill (empty cache, causal mask over the new tokens) or one new token that
    sees everything before it (no mask needed). A StaticKVCache masks by position instead.
    """
    if isinstance(cache, StaticKVCache):
        k, v, visible = cache.append(k, v)
        # written out rather than SDPA: under torch.compile the few-query attention then
        # fuses with its neighbours instead of calling the flash kernel
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, nh, T, S)
        return scores.masked_fill(~visible, float("-inf")).softmax(dim=-1) @ v
    if cache is not None:
        first = cache.length == 0
        k, v = cache.append(k, v)
        if causal and not first:
            if q.shape[2] != 1:
                raise ValueError("a cached causal step must feed exactly one new token")
            causal = False
    T = q.shape[2]
    if q.device.type == "cpu" and 1 < T == k.shape[2] and dropout_p == 0.0:
        backward = torch.is_grad_enabled() and q.requires_grad
        if T <= (SHORT_SEQUENCE_WITH_GRAD if backward else SHORT_SEQUENCE):
            return explicit_attention(q, k, v, causal)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)


def explicit_attention(q, k, v, causal):
    """softmax(q k^T / sqrt(hd)) v with materialised (B, nh, T, T) scores, as the official
    pixel head computes it; for short self-attention (queries = keys)."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, nh, T, T)
    if causal:
        T = scores.shape[-1]
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    """timm-style multi-head self-attention (`qkv`, `proj`), causal or bidirectional."""

    def __init__(self, dim, num_heads, qkv_bias=True, attn_drop=0.0, proj_drop=0.0, causal=False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.causal = causal
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)  # its p is handed to SDPA
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, cache=None, keep=None):
        """x: (B, T, D) -> (B, T, D); with keep (B, K) token indices (bidirectional only),
        only those tokens query (every token is still a key and value) -> (B, K, D)."""
        B, T, D = x.shape
        # (B, T, 3D) -> (B, T, 3, nh, hd) -> three (B, nh, T, hd) views
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if keep is not None:
            if self.causal:
                raise ValueError("keep selects queries of bidirectional attention only")
            q = q.gather(2, keep[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))  # (B, nh, K, hd)
        p = self.attn_drop.p if self.training else 0.0
        x = merge_heads(attend(q, k, v, self.causal, p, cache))
        return dropout_in_training(self.proj_drop, self.proj(x))


class Mlp(timm.layers.Mlp):
    """timm's Mlp (fc1 -> GELU -> dropout -> fc2 -> dropout; the same parameters, names and
    exact-erf GELU), with a forward that skips the identity modules in eval: sampling runs
    each block once per token, and the three extra module calls (two dropouts and timm's
    `norm`, an Identity here) cost 5-14% of fractalar_tiny's sampling time in paired runs."""

    def __init__(self, dim, hidden_dim, drop=0.0):
        super().__init__(dim, hidden_dim, act_layer=nn.GELU, drop=drop)

    def forward(self, x):
        if self.training:
            return super().forward(x)
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with timm parameter names (norm1, attn, norm2, mlp)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, attn_drop=0.0, proj_drop=0.0, causal=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop,
                              proj_drop=proj_drop, causal=causal)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x, cache=None, keep=None):
        """x: (B, T, D) -> (B, T, D). keep: optional (B, K) indices of the tokens whose
        outputs are wanted; the others are skipped after serving as keys and values (the
        attention projection and MLP run on K rows only) -> (B, K, D)."""
        h = self.attn(self.norm1(x), cache=cache, keep=keep)
        x = (x if keep is None else take_rows(x, keep)) + h
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks, x, use_checkpoint=False, caches=None, **block_kwargs):
    """Apply `blocks` in turn; recompute activations in backward when `use_checkpoint`
    (training only; sampling passes `caches`, one per block)."""
    for i, block in enumerate(blocks):
        if caches is not None:
            x = block(x, cache=caches[i], **block_kwargs)
        elif use_checkpoint and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False, **block_kwargs)
        else:
            x = block(x, **block_kwargs)
    return x
