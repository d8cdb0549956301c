"""Attention with a KV-shift kind picked by a string (vanilla, the paper's variants).

The shift acts on the raw per-KV-head projections k, v (B, T, H_kv, D), BEFORE RoPE and before the
GQA repeat, exactly as in the paper's code. Coefficients are stored current-first, the layout of
`kvshift.kv_shift`'s weight: coefficient[:, 0] multiplies the current token, [:, j] the token j back.

Decoding state (the last raw k/v tokens) lives in the cache object passed in, never on the module.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvshift.layers.gqa import masked_gqa_native
from kvshift.layers.stateless import stateless_attention
from kvshift.ops.rope import apply_rope, apply_rope_pointwise
from kvshift.ops.shift import dispatch_shift, dispatch_shift_rope, use_triton
from kvshift.ops.shift import naive as naive_shift
from kvshift.ops.shift.attention import ATTENTION_BACKENDS, flash_supported, shift_attention
from kvshift.ops.varlen import varlen_attention

# the attention kinds: which sides shift (keys, values), and how coefficients are parametrised
SHIFT_KINDS: dict[str, tuple[bool, bool, str]] = {
    "vanilla": (False, False, "free"),
    "kvshift": (True, True, "free"),
    "kvshift_gate": (True, True, "gate"),
    "kvshift_clamp": (True, True, "clamp"),
    "kshift": (True, False, "free"),
    "vshift": (False, True, "free"),
}
ATTENTION_KINDS = tuple(SHIFT_KINDS)
# packed documents attend through the varlen flash kernels on CUDA (`kvshift.ops.varlen`); elsewhere through
# SDPA with the block-diagonal mask, unless this is set (tests: the varlen op's exact CPU math)
VARLEN_OFF_CUDA = False
# kinds whose coefficients hold the identity shift exactly (a gate's softmax would need an infinite logit)
IDENTITY_KINDS = tuple(kind for kind, (_, _, param) in SHIFT_KINDS.items() if param != "gate")


def paper_init(n_heads: int, window: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's init, current-first (n_heads, window+1): the first `window` taps ~ U(0,1), the last
    one 1 - sum of the others. For window 1 this is alpha1 = r, alpha2 = 1 - r."""
    first = torch.rand(n_heads, window, generator=generator)
    last = 1.0 - first.sum(dim=1, keepdim=True)
    return torch.cat([first, last], dim=1)


SHIFT_INITS = ("uniform", "half")


def initial_coefficients(n_heads: int, window: int, shift_init: str = "uniform", param: str = "free",
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """The stored initial value of one side's shift parameter for a kind parametrised by `param`.

    shift_init "uniform": the paper's draw (`paper_init`, from `generator`); "half": every tap 1/(window+1),
    so alpha = (0.5, 0.5) for window 1 (the generator is not used). "free" and "clamp" store the
    coefficients, (n_heads, window+1); "gate" stores the logits a_0 .. a_{W-2} of softmax([a, 0]),
    (n_heads, window): log-ratios of the coefficients, with the paper draw clipped at 1e-3 first (softmax
    coefficients are positive)."""
    if shift_init not in SHIFT_INITS:
        raise ValueError(f"shift_init must be one of {SHIFT_INITS}, got {shift_init!r}")
    if shift_init == "uniform":
        c = paper_init(n_heads, window, generator)
    else:
        c = torch.full((n_heads, window + 1), 1.0 / (window + 1))
    if param != "gate":
        return c
    c = c.clamp_min(1e-3)
    c = c / c.sum(dim=1, keepdim=True)
    return torch.log(c[:, :-1] / c[:, -1:])


def identity_coefficients(n_heads: int, window: int) -> torch.Tensor:
    c = torch.zeros(n_heads, window + 1)
    c[:, 0] = 1.0
    return c


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Press et al.'s geometric slopes 2^(-8 i / n) (closest power of two, interleaved otherwise)."""
    def pow2(n):
        start = 2 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]
    if math.log2(n_heads).is_integer():
        s = pow2(n_heads)
    else:
        p = 2 ** math.floor(math.log2(n_heads))
        s = pow2(p) + pow2(2 * p)[0::2][: n_heads - p]
    return torch.tensor(s, dtype=torch.float32)


class Attention(nn.Module):
    """Multi-head / grouped-query causal attention with an optional KV shift.

    position: "rope" rotates q and k here, "alibi" biases the scores here; "learned" and "none" do
    nothing here (learned absolute position embeddings are added to the model's input, not in attention).
    shift_init: the initial coefficients, "uniform" (the paper's draw) or "half" (see
    `initial_coefficients`)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, *, attention: str = "kvshift",
                 shift_window: int = 1, position: str = "rope", shift_impl: str = "auto",
                 layer_idx: int = 0, shift_init: str = "uniform"):
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
        self.dim, self.n_heads, self.n_kv_heads = dim, n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.kind, self.window, self.position, self.shift_impl = attention, shift_window, position, shift_impl
        self.layer_idx = layer_idx
        if shift_init not in SHIFT_INITS:
            raise ValueError(f"shift_init must be one of {SHIFT_INITS}, got {shift_init!r}")
        self.shift_init = shift_init
        # with the Triton backend, training uses one op for shift + RoPE(K) + attention that saves only raw
        # k, v and recomputes k̂, v̂ in the backward (default: vanilla's memory, 1.2-3.5% below its speed
        # on the H200), or with set_fused_attention(model, False) separate Triton shift ops + SDPA (closer
        # to vanilla's speed, +2-7% training memory). results/bench/nvidia-h200.md has both.
        self.fuse_attention = True
        self.attention_backend = "auto"  # of the one-op path: auto | cudnn | flash (set_fused_attention)
        self._ident: torch.Tensor | None = None  # identity coefficients for the decode kernel (see _identity)
        self.shift_keys, self.shift_values, self.param = SHIFT_KINDS[attention]
        self.qkv_mixer: nn.Module | None = None  # set by the model: a mixer of q, k, v (kvshift.layers.mixers)
        hd = self.head_dim
        self.wq = nn.Linear(dim, n_heads * hd, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(n_heads * hd, dim, bias=False)
        W = shift_window + 1
        if self.param == "gate":
            # coefficients = softmax([a_0 .. a_{W-2}, 0]); for W = 2 exactly alpha1 = sigmoid(a), alpha2 = 1 - alpha1
            shape = (n_kv_heads, W - 1)
            names = ("shift_k_gate", "shift_v_gate")
        else:
            shape = (n_kv_heads, W)
            names = ("shift_k", "shift_v")
        for side, name in zip((self.shift_keys, self.shift_values), names):
            if side:
                self.register_parameter(name, nn.Parameter(torch.zeros(shape)))
        if position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(n_heads), persistent=False)
        self.reset_shift(None)

    # ---- shift coefficients -------------------------------------------------------------------
    @torch.no_grad()
    def reset_shift(self, generator: torch.Generator | None) -> None:
        """The initial coefficients of `self.shift_init` ("uniform": the paper's draw from `generator`, its
        own stream, so shared weights stay equal across arms; "half": every tap 1/(window+1))."""
        for name in ("shift_k", "shift_v", "shift_k_gate", "shift_v_gate"):
            p = getattr(self, name, None)
            if p is not None:
                p.copy_(initial_coefficients(self.n_kv_heads, self.window, self.shift_init, self.param, generator))

    def _coefficients(self, side: str) -> torch.Tensor | None:
        if self.param == "gate":
            a = getattr(self, f"shift_{side}_gate", None)
            if a is None:
                return None
            return torch.softmax(torch.cat([a, a.new_zeros(a.shape[0], 1)], dim=1), dim=1)
        c = getattr(self, f"shift_{side}", None)
        if c is None:
            return None
        return c.clamp(0.0, 1.0) if self.param == "clamp" else c

    def shift_coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, beta), each (n_kv_heads, window+1), current-first, after gate/clamp; identity where
        a side is not shifted."""
        ident = identity_coefficients(self.n_kv_heads, self.window)
        out = []
        for side in ("k", "v"):
            c = self._coefficients(side)
            out.append(ident.clone() if c is None else c.detach().float().cpu())
        return out[0], out[1]

    # ---- forward ------------------------------------------------------------------------------
    def _shift(self, x: torch.Tensor, coef: torch.Tensor | None, prev: torch.Tensor | None,
               cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        if coef is None:
            return x
        if cu_seqlens is not None:  # packed documents over the flattened (B*T) tokens
            B, T, H, D = x.shape
            return dispatch_shift(x.reshape(B * T, H, D), coef, cu_seqlens, None, self.shift_impl).view(B, T, H, D)
        return dispatch_shift(x, coef, None, prev, self.shift_impl)

    def _shift_rope(self, k: torch.Tensor, coef: torch.Tensor, prev: torch.Tensor | None,
                    ctx: "AttentionContext") -> torch.Tensor:
        if ctx.cu_seqlens is not None:
            B, T, H, D = k.shape
            cos, sin = (c.expand(B, T, -1).reshape(B * T, -1) for c in (ctx.cos, ctx.sin))
            return dispatch_shift_rope(k.reshape(B * T, H, D), coef, cos, sin, ctx.cu_seqlens, None,
                                       self.shift_impl).view(B, T, H, D)
        return dispatch_shift_rope(k, coef, ctx.cos, ctx.sin, None, prev, self.shift_impl)

    def forward(self, x: torch.Tensor, ctx: "AttentionContext") -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        q = self.wq(x).view(B, T, self.n_heads, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, hd)  # raw keys   (B, T, Hkv, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, hd)  # raw values (B, T, Hkv, D)
        if self.qkv_mixer is not None:  # before the shift and RoPE
            q, k, v = self.qkv_mixer(ctx, q, k, v)
        if ctx.slot is not None:  # the static-shape decode step (LM.generate(compile=True))
            return self._decode_static(q, k, v, ctx, B)
        if ctx.token_valid is not None:
            # pads are zero raw tokens, so a row's first real token sees zeros before it
            keep = ctx.token_valid.view(B, T, 1, 1).to(k.dtype)
            k, v = k * keep, v * keep
        cache = ctx.cache
        if getattr(cache, "stateless", False):  # a standard cache, shifted on read (kvshift.layers.stateless)
            return stateless_attention(self, q, k, v, ctx)
        prev_k = prev_v = None
        if cache is not None and self.kind != "vanilla":
            prev_k, prev_v = cache.raw(self.layer_idx)
        coef_k = self._coefficients("k")
        coef_v = self._coefficients("v")
        if cache is not None and T == 1 and ctx.token_valid is None and self._fused_decode(x):
            # decode step: RoPE(q), shift + RoPE(k), shift(v) and the cache append in one kernel; an
            # unshifted side (and a vanilla layer, window 0) uses identity coefficients
            ident = self._identity(cache.window + 1, x.device)
            q, k_hat, v_hat = cache.append_decode(self.layer_idx, q, k, v, ident if coef_k is None else coef_k,
                                                  ident if coef_v is None else coef_v, ctx.cos, ctx.sin)
            return self._attend(q, k_hat, v_hat, ctx, B, T)
        if self._shift_attention_ok(x, q, ctx, coef_k, coef_v):
            return self._shift_attend(apply_rope(q, ctx.cos, ctx.sin), k, v, coef_k, coef_v, ctx, B, T)
        if self.position == "rope":
            q = apply_rope(q, ctx.cos, ctx.sin)
            # the K path: shift then rotate, one fused pass on the Triton backend
            k_hat = apply_rope(k, ctx.cos, ctx.sin) if coef_k is None else self._shift_rope(k, coef_k, prev_k, ctx)
        else:
            k_hat = self._shift(k, coef_k, prev_k, ctx.cu_seqlens)
        v_hat = self._shift(v, coef_v, prev_v, ctx.cu_seqlens)
        if cache is not None:
            k_hat, v_hat = cache.update(self.layer_idx, k_hat, v_hat, k, v)  # (B, S, Hkv, D) each
        return self._attend(q, k_hat, v_hat, ctx, B, T)

    def _decode_static(self, q, k, v, ctx: "AttentionContext", B: int) -> torch.Tensor:
        """One token per row (B, 1, ...) against the cache's whole allocation: the shift and RoPE in pure PyTorch
        (whatever shift_impl says: inside torch.compile it fuses anyway) with the fused decode kernel's arithmetic
        (an fp32 shift, rounded once at the cache write; the naive eager path rounds the shifted key before RoPE
        too), written so inductor makes one kernel of each side's shift, RoPE and cache write: no torch.cat, and
        RoPE's partner channels read from a copy of the raw key window rolled by D/2 (`KVCache.raw_k_rolled`)
        so the window's in-place update touches only channels its own element read. The write goes by index at
        ctx.slot (`KVCache.write_static`), and attention runs over every slot with ctx.mask hiding unwritten
        and pad slots. Shapes never change from step to step and nothing is read back to
        the host. GQA never repeats the cache per query head (the eager path's repeat_interleave copies it):
        with ctx.gqa_heads (SDPA picks cuDNN's attention for it, `static_decode.gqa_heads_ok`) each query head is
        one query row against the Hkv cache heads (enable_gqa), which cuDNN splits over the cache; else a KV
        group's query heads are the query rows of one call (any kernel, but B * Hkv programs: on an H200 at
        batch 1 and an 8k cache it took 8.9x as long)."""
        cache, L = ctx.cache, self.layer_idx
        prev_k, prev_v = cache.raw(L) if cache.window else (None, None)
        coef_k, coef_v = self._coefficients("k"), self._coefficients("v")
        rolled = None
        if self.position == "rope":
            q = apply_rope(q, ctx.cos, ctx.sin)
            # fp32 shift, RoPE, one rounding at the cache write: the fused decode kernel's arithmetic
            if coef_k is None:
                k_hat = apply_rope(k, ctx.cos, ctx.sin)  # as vanilla's step, kernel for kernel
            else:
                shifted = naive_shift.shift_step(k, coef_k, prev_k)
                if cache.raw_k_rolled is not None:
                    # RoPE pairs channel d with d ± D/2: shifting a rolled copy of the window too means no
                    # element reads a channel another one writes, so the window update fuses into this kernel
                    rolled = torch.roll(k, k.shape[-1] // 2, dims=-1)
                    rot = naive_shift.shift_step(rolled, coef_k, cache.raw_k_rolled[L])
                    k_hat = apply_rope_pointwise(shifted, ctx.cos, ctx.sin, rolled=rot)
                else:
                    k_hat = apply_rope_pointwise(shifted, ctx.cos, ctx.sin)
        else:
            k_hat = k if coef_k is None else naive_shift.shift_step(k, coef_k, prev_k)
        v_hat = v if coef_v is None else naive_shift.shift_step(v, coef_v, prev_v)
        k_all, v_all = cache.write_static(L, ctx.slot, k_hat, v_hat, k, v, rolled)  # (B, S, Hkv, D)
        H, G, hd = self.n_heads, self.n_kv_heads, self.head_dim
        S = k_all.shape[1]
        # head h = g * (H/G) + r reads KV head g, as after repeat_interleave (and as enable_gqa pairs them)
        rows = G != H and not ctx.gqa_heads
        qh = q.reshape(B, G, H // G, hd) if rows else q.reshape(B, H, 1, hd)
        mask = ctx.mask  # (B, 1, 1, S) bool
        if self.position == "alibi":
            bias = -self.alibi_slopes.view(1, -1, 1, 1) * ctx.distance.unsqueeze(1)  # (B, H, 1, S)
            mask = bias.masked_fill(~mask, float("-inf")).view(qh.shape[:3] + (S,)).to(qh.dtype)
        out = F.scaled_dot_product_attention(qh, k_all.transpose(1, 2), v_all.transpose(1, 2), attn_mask=mask,
                                             enable_gqa=G != H and not rows)
        return self.wo(out.reshape(B, 1, H * hd))

    def _identity(self, width: int, device: torch.device) -> torch.Tensor:
        """(n_kv_heads, width) identity coefficients, built once per device (decode runs it every step)."""
        c = getattr(self, "_ident", None)
        if c is None or c.shape[1] != width or c.device != device:
            c = self._ident = identity_coefficients(self.n_kv_heads, width - 1).to(device)
        return c

    def _shift_attention_ok(self, x, q, ctx: "AttentionContext", coef_k, coef_v) -> bool:
        """The one-op path: both sides shifted, RoPE, training-style causal attention (plain or packed
        documents), no cache or padding, a fused backend and a dtype/head dim the flash kernels take."""
        return (self.fuse_attention and coef_k is not None and coef_v is not None and self.position == "rope"
                and ctx.cache is None and ctx.token_valid is None and ctx.causal
                and (ctx.mask is None or ctx.cu_seqlens is not None)
                and use_triton(self.shift_impl, x) and flash_supported(q))

    def _shift_attend(self, q, k, v, coef_k, coef_v, ctx: "AttentionContext", B: int, T: int) -> torch.Tensor:
        if ctx.cu_seqlens is None:
            out = shift_attention(q, k, v, coef_k, coef_v, ctx.cos, ctx.sin, impl="triton",
                                  backend=self.attention_backend)
        else:  # packed documents over the flattened B*T tokens; no document is longer than T
            cos, sin = (c.expand(B, T, -1).reshape(B * T, -1) for c in (ctx.cos, ctx.sin))
            flat = lambda t: t.reshape(B * T, t.shape[2], t.shape[3])  # noqa: E731
            out = shift_attention(flat(q), flat(k), flat(v), coef_k, coef_v, cos, sin, cu_seqlens=ctx.cu_seqlens,
                                  max_seqlen=T, impl="triton", backend=self.attention_backend)
        return self.wo(out.reshape(B, T, self.n_heads * self.head_dim))

    def _fused_decode(self, x: torch.Tensor) -> bool:
        if self.position != "rope":
            return False
        return use_triton(self.shift_impl, x)

    def _varlen_ok(self, q: torch.Tensor, k_hat: torch.Tensor, ctx: "AttentionContext", T: int) -> bool:
        """Packed documents, training-style (no cache: keys are the T new tokens), no position bias: the
        varlen kernels, the ones the fused shift path uses for packed batches, so every kind pays the same."""
        return (ctx.cu_seqlens is not None and ctx.causal and k_hat.shape[1] == T and self.position != "alibi"
                and ctx.token_valid is None and ((q.is_cuda and flash_supported(q)) or VARLEN_OFF_CUDA))

    def _attend(self, q, k_hat, v_hat, ctx: "AttentionContext", B: int, T: int) -> torch.Tensor:
        hd = self.head_dim
        if self._varlen_ok(q, k_hat, ctx, T):
            flat = lambda t: t.reshape(B * T, t.shape[2], hd)  # noqa: E731
            out = varlen_attention(flat(q), flat(k_hat), flat(v_hat), ctx.cu_seqlens, max_seqlen=T)
            return self.wo(out.reshape(B, T, self.n_heads * hd))
        qh, kh, vh = q.transpose(1, 2), k_hat.transpose(1, 2), v_hat.transpose(1, 2)  # (B, H, T|S, D)
        mask = ctx.mask
        if self.position == "alibi":
            bias = -self.alibi_slopes.view(1, -1, 1, 1) * ctx.distance.unsqueeze(1)  # (B, H, T, S)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        gqa = self.n_heads != self.n_kv_heads
        if mask is None:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=ctx.causal, enable_gqa=gqa)
        else:
            if mask.dtype != torch.bool:
                mask = mask.to(qh.dtype)
            # masked GQA: K/V as they are where SDPA picks cuDNN for it, else repeated per head (kvshift.layers.gqa)
            native = gqa and masked_gqa_native(qh, kh, mask)
            if gqa and not native:
                rep = self.n_heads // self.n_kv_heads
                kh, vh = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=native)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * hd))


def set_fused_attention(model: nn.Module, enabled: bool, backend: str = "auto") -> nn.Module:
    """Turn the one-op shift + attention path of every `Attention` in `model` on (the default: vanilla's
    training memory; the benchmark's "fused" arm) or off (separate Triton shift ops and SDPA, the
    benchmark's "fused-sdpa" arm). backend: its CUDA attention kernels, "auto" (cuDNN for dense batches,
    flash for packed ones), "cudnn" or "flash" (the benchmark's "fused-flash" arm)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    for m in model.modules():
        if isinstance(m, Attention):
            m.fuse_attention = bool(enabled)
            m.attention_backend = backend
    return model


class AttentionContext:
    """What every layer of one forward call shares: positions, masks, packing and the cache."""

    __slots__ = ("cos", "sin", "mask", "distance", "token_valid", "cu_seqlens", "cache", "causal", "positions",
                 "slot", "gqa_heads")

    def __init__(self, *, cos=None, sin=None, mask=None, distance=None, token_valid=None,
                 cu_seqlens=None, cache=None, causal=True, positions=None, slot=None, gqa_heads=False):
        self.cos, self.sin = cos, sin  # (B, T, D/2) fp32 for RoPE
        self.mask = mask  # None (plain causal) or bool (B, 1, T, S): True = may attend
        self.distance = distance  # (B, T, S) fp32 query-key distance for ALiBi
        self.token_valid = token_valid  # (B, T) bool for left-padded batches, else None
        self.cu_seqlens = cu_seqlens  # int32 (docs+1,) over the flattened B*T tokens when packed
        self.cache = cache
        self.causal = causal  # with mask None: causal (T == S) or every query sees every key (one decode token)
        self.positions = positions  # (B or 1, T) long positions of the new tokens (learned position embeddings)
        self.slot = slot  # (1,) long device tensor: the static decode step's write slot (KVCache.write_static)
        self.gqa_heads = gqa_heads  # static step: one query row per head under GQA (Attention._decode_static)
