"""Fused Triton KV shift: plain (V path) and shift+RoPE (K path), forward/backward, plus a decode step.

Public entry points (inputs are validated by `kvshift.ops.shift`, not here):
    kv_shift(x, weight, *, cu_seqlens=None, prev=None)
    shift_rope(k, weight, cos, sin, *, cu_seqlens=None, prev=None)
    shift_rope_decode(k_new, v_new, w_k, w_v, raw_k, raw_v, cos, sin, k_cache, v_cache, pos)

The ops are registered as torch custom ops (`kvshift::shift_fwd`, `kvshift::shift_bwd`,
`kvshift::shift_rope_decode`) with fake and autograd rules, so torch.compile(fullgraph=True)
keeps them in the graph. The backward recomputes the taps from the raw inputs; only x, weight,
prev (and cos/sin, cu_seqlens) are saved. fp64 inputs fall back to the naive reference.

This module deliberately does not use `from __future__ import annotations`: custom_op infers its
schema from the real annotations.
"""

import os
from typing import Optional, Tuple

import torch
import triton

from kvshift.ops.rope import apply_rope

from . import naive
from .triton_kernels import (
    decode_kernel,
    shift_bwd_kernel,
    shift_dprev_kernel,
    shift_fwd_kernel,
    shift_kv_bwd_kernel,
    shift_kv_fwd_kernel,
)

Tensor = torch.Tensor


def is_available() -> bool:
    """Triton imported (it did, or this module would not load) and there is a device to run on."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# launch helpers


def search_steps(n_docs: int) -> int:
    """Halvings of the kernels' binary search over n_docs documents: bit_length(n_docs) suffices; rounded up to
    a multiple of 4 (at least 8) so a batch's changing document count rarely compiles a new kernel variant."""
    return max(8, -(-int(n_docs).bit_length() // 4) * 4)


class _Layout:
    """Row view of the input: N rows of (H, D); padded (T > 0), or packed: cu (B+1,) int32, the kernels find
    each row's document by a binary search of it (nsteps halvings), so nothing is built per call."""

    def __init__(self, x: Tensor, cu_seqlens: Optional[Tensor]):
        if cu_seqlens is None:
            B, T, H, D = x.shape
            self.N, self.T, self.B = B * T, T, B
            self.cu = None
        else:
            N, H, D = x.shape
            self.N, self.T, self.B = N, 0, cu_seqlens.numel() - 1
            self.cu = cu_seqlens.to(device=x.device, dtype=torch.int32).contiguous()  # no copy for the model's
        self.H, self.D = H, D
        self.varlen = cu_seqlens is not None
        self.nsteps = search_steps(self.B) if self.varlen else 1

    def doc_args(self, x: Tensor):
        """(CU, NDOC) kernel arguments: x stands in for the unused pointer of a padded layout."""
        return (self.cu, self.B) if self.varlen else (x, 0)


def _rope_strides(cos: Optional[Tensor], sin: Optional[Tensor], lay: _Layout):
    if cos is None:
        return None, None, 0, 0
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():  # the kernels index both with cos's strides
        cos, sin = cos.contiguous(), sin.contiguous()
    if lay.varlen:  # (N, D/2)
        return cos, sin, 0, cos.stride(0)
    # (B or 1, T, D/2): a size-1 batch axis broadcasts
    return cos, sin, (cos.stride(0) if cos.shape[0] > 1 else 0), cos.stride(1)


def _blocks(lay: _Layout, rope: bool):
    ncol = lay.D // 2 if rope else lay.D
    block_d = triton.next_power_of_2(max(ncol, 1))
    budget = 2048 if rope else 4096  # elements per tile (ROPE holds two half tiles)
    block_t = max(16, min(64, budget // block_d))
    block_t = min(block_t, max(16, triton.next_power_of_2(max(lay.N, 1))))
    return block_t, block_d


def launch_shift_fwd(x: Tensor, weight: Tensor, prev: Optional[Tensor], cu_seqlens: Optional[Tensor],
                     cos: Optional[Tensor], sin: Optional[Tensor]) -> Tensor:
    """The forward kernel launch behind `shift_fwd` (callable inside another custom op)."""
    rope = cos is not None
    x = x.contiguous()
    w = weight.contiguous()
    lay = _Layout(x, cu_seqlens)
    y = torch.empty_like(x)
    if lay.N == 0 or lay.H == 0 or lay.D == 0:
        return y
    W = w.shape[1]
    has_prev = prev is not None and W > 1
    prev_c = prev.contiguous() if has_prev else x
    cos, sin, scb, sct = _rope_strides(cos, sin, lay)
    block_t, block_d = _blocks(lay, rope)
    grid = (triton.cdiv(lay.N, block_t), lay.H)
    shift_fwd_kernel[grid](
        x, w, prev_c, *lay.doc_args(x), cos if rope else x, sin if rope else x, y,
        lay.N, lay.T, lay.H, lay.D, lay.D // 2, scb, sct,
        W=W, HAS_PREV=has_prev, VARLEN=lay.varlen, ROPE=rope, BLOCK_T=block_t, BLOCK_D=block_d, NSTEP=lay.nsteps,
    )
    return y


def launch_shift_bwd(dy: Tensor, x: Tensor, weight: Tensor, prev: Optional[Tensor], cu_seqlens: Optional[Tensor],
                     cos: Optional[Tensor], sin: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """The backward kernel launches behind `shift_bwd` (callable inside another custom op)."""
    rope = cos is not None
    x = x.contiguous()
    dy = dy.contiguous()
    w = weight.contiguous()
    lay = _Layout(x, cu_seqlens)
    H, W = w.shape
    has_prev = prev is not None and W > 1
    prev_c = prev.contiguous() if has_prev else x
    cos, sin, scb, sct = _rope_strides(cos, sin, lay)
    block_t, block_d = _blocks(lay, rope)
    nblk = triton.cdiv(lay.N, block_t)
    dx = torch.empty_like(x)
    if nblk > 0 and lay.D > 0 and H > 0:
        dwp = torch.empty(nblk, H, W, device=x.device, dtype=torch.float32)  # per-program sums: every one written
        shift_bwd_kernel[(nblk, H)](
            x, w, prev_c, *lay.doc_args(x), cos if rope else x, sin if rope else x, dy, dx, dwp,
            lay.N, lay.T, lay.H, lay.D, lay.D // 2, scb, sct,
            W=W, HAS_PREV=has_prev, VARLEN=lay.varlen, ROPE=rope, BLOCK_T=block_t, BLOCK_D=block_d,
            NSTEP=lay.nsteps,
        )
        dw = dwp.sum(0).to(weight.dtype)  # fixed-order reduction: deterministic
    else:  # nothing to launch: no rows, heads or channels contribute
        dw = torch.zeros(H, W, device=x.device, dtype=weight.dtype)
    if prev is None:
        return dx, dw, x.new_zeros(0)
    if has_prev and lay.B > 0 and lay.D > 0 and H > 0:
        dprev = torch.empty(prev.shape, device=prev.device, dtype=prev.dtype)
        shift_dprev_kernel[(lay.B, H)](
            w, lay.cu if lay.varlen else x, cos if rope else x, sin if rope else x, dy, dprev,
            lay.T, lay.H, lay.D, lay.D // 2, scb, sct,
            W=W, VARLEN=lay.varlen, ROPE=rope, BLOCK_D=block_d,
        )
    else:
        dprev = torch.zeros(prev.shape, device=prev.device, dtype=prev.dtype)
    return dx, dw, dprev


def _kv_blocks(lay: _Layout, block_t: Optional[int] = None, num_warps: Optional[int] = None):
    """(BLOCK_T, BLOCK_DK, BLOCK_DV) of the one-launch K+V kernels: K's tile is two half-width RoPE tiles, V's
    one full-width tile: the same number of elements, so the row block of either alone fits both; and the
    launch options. block_t / num_warps: tuning overrides (scripts/dev/shift_sweep.py), None for the defaults
    (the row block from `_blocks`, Triton's 4 warps)."""
    default_t, block_dk = _blocks(lay, True)
    if block_t is not None and (isinstance(block_t, bool) or not isinstance(block_t, int) or block_t < 16
                                or block_t & (block_t - 1)):
        raise ValueError(f"block_t must be a power of two >= 16, got {block_t!r}")
    if num_warps is not None and (isinstance(num_warps, bool) or num_warps not in (1, 2, 4, 8, 16)):
        raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {num_warps!r}")
    opts = {} if num_warps is None else {"num_warps": int(num_warps)}
    return block_t or default_t, block_dk, triton.next_power_of_2(max(lay.D, 1)), opts


def launch_shift_kv_fwd(k: Tensor, v: Tensor, w_k: Tensor, w_v: Tensor, cu_seqlens: Optional[Tensor],
                        cos: Tensor, sin: Tensor, *, block_t: Optional[int] = None,
                        num_warps: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """(RoPE(shift(k)), shift(v)) of one layer in one launch; k and v share their shape (no prev). block_t /
    num_warps: launch overrides for tuning (`_kv_blocks`)."""
    assert k.shape == v.shape and w_k.shape[0] == w_v.shape[0] == k.shape[-2], "k/v and w_k/w_v must match"
    k, v = k.contiguous(), v.contiguous()
    wk, wv = w_k.contiguous(), w_v.contiguous()
    lay = _Layout(k, cu_seqlens)
    block_t, block_dk, block_dv, opts = _kv_blocks(lay, block_t, num_warps)
    yk, yv = torch.empty_like(k), torch.empty_like(v)
    if lay.N == 0 or lay.H == 0 or lay.D == 0:
        return yk, yv
    cos, sin, scb, sct = _rope_strides(cos, sin, lay)
    shift_kv_fwd_kernel[(triton.cdiv(lay.N, block_t), lay.H)](
        k, v, wk, wv, *lay.doc_args(k), cos, sin, yk, yv,
        lay.N, lay.T, lay.H, lay.D, lay.D // 2, scb, sct,
        WKN=wk.shape[1], WVN=wv.shape[1], VARLEN=lay.varlen, BLOCK_T=block_t, BLOCK_DK=block_dk,
        BLOCK_DV=block_dv, NSTEP=lay.nsteps, **opts,
    )
    return yk, yv


def launch_shift_kv_bwd(dk_hat: Tensor, dv_hat: Tensor, k: Tensor, v: Tensor, w_k: Tensor, w_v: Tensor,
                        cu_seqlens: Optional[Tensor], cos: Tensor, sin: Tensor, *, block_t: Optional[int] = None,
                        num_warps: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """The backward of `launch_shift_kv_fwd` in one launch plus one reduction: (dk, dv, dw) with dw flat
    (H * (Wk + Wv),) fp32: K's (H, Wk) coefficient grads, then V's (H, Wv), each block contiguous (the caller
    views them apart, no copy). block_t / num_warps: launch overrides for tuning (`_kv_blocks`)."""
    assert k.shape == v.shape == dk_hat.shape == dv_hat.shape and w_k.shape[0] == w_v.shape[0] == k.shape[-2], \
        "k/v, their grads and w_k/w_v must match"
    k, v = k.contiguous(), v.contiguous()
    dk_hat, dv_hat = dk_hat.contiguous(), dv_hat.contiguous()
    wk, wv = w_k.contiguous(), w_v.contiguous()
    lay = _Layout(k, cu_seqlens)
    H, Wk, Wv = lay.H, wk.shape[1], wv.shape[1]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    block_t, block_dk, block_dv, opts = _kv_blocks(lay, block_t, num_warps)
    nblk = triton.cdiv(lay.N, block_t)
    if nblk == 0 or lay.D == 0 or H == 0:  # nothing to launch: no rows, heads or channels contribute
        return dk.zero_(), dv.zero_(), torch.zeros(H * (Wk + Wv), device=k.device, dtype=torch.float32)
    cos, sin, scb, sct = _rope_strides(cos, sin, lay)
    dwp = torch.empty(nblk, H * (Wk + Wv), device=k.device, dtype=torch.float32)  # every entry written
    shift_kv_bwd_kernel[(nblk, H)](
        k, v, wk, wv, *lay.doc_args(k), cos, sin, dk_hat, dv_hat, dk, dv, dwp,
        lay.N, lay.T, lay.H, lay.D, lay.D // 2, scb, sct,
        WKN=Wk, WVN=Wv, VARLEN=lay.varlen, BLOCK_T=block_t, BLOCK_DK=block_dk, BLOCK_DV=block_dv,
        NSTEP=lay.nsteps, **opts,
    )
    return dk, dv, dwp.sum(0)  # fixed-order reduction: deterministic


# ----------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("kvshift::shift_fwd", mutates_args=())
def shift_fwd(x: Tensor, weight: Tensor, prev: Optional[Tensor], cu_seqlens: Optional[Tensor],
              cos: Optional[Tensor], sin: Optional[Tensor]) -> Tensor:
    """Shifted x (or RoPE(shifted x) when cos/sin are given); same shape and dtype as x."""
    return launch_shift_fwd(x, weight, prev, cu_seqlens, cos, sin)


@shift_fwd.register_fake
def _(x, weight, prev, cu_seqlens, cos, sin):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("kvshift::shift_bwd", mutates_args=())
def shift_bwd(dy: Tensor, x: Tensor, weight: Tensor, prev: Optional[Tensor], cu_seqlens: Optional[Tensor],
              cos: Optional[Tensor], sin: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dprev); dprev is an empty (0,) tensor when prev is None."""
    return launch_shift_bwd(dy, x, weight, prev, cu_seqlens, cos, sin)


@shift_bwd.register_fake
def _(dy, x, weight, prev, cu_seqlens, cos, sin):
    dprev = x.new_empty(0) if prev is None else torch.empty_like(prev, memory_format=torch.contiguous_format)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format), dprev)


def _setup_context(ctx, inputs, output):
    x, weight, prev, cu_seqlens, cos, sin = inputs
    ctx.has_prev = prev is not None
    ctx.save_for_backward(x, weight, prev, cu_seqlens, cos, sin)


def _backward(ctx, dy):
    x, weight, prev, cu_seqlens, cos, sin = ctx.saved_tensors
    dx, dw, dprev = shift_bwd(dy, x, weight, prev, cu_seqlens, cos, sin)
    return dx, dw, (dprev if ctx.has_prev else None), None, None, None


shift_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("kvshift::shift_rope_decode", mutates_args=("raw_k", "raw_v", "k_cache", "v_cache"))
def _shift_rope_decode_op(q: Tensor, k_new: Tensor, v_new: Tensor, w_k: Tensor, w_v: Tensor, raw_k: Tensor,
                          raw_v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                          pos: int) -> Tensor:
    B, _, H, D = k_new.shape
    q = q.contiguous()
    q_rot = torch.empty_like(q)
    if B == 0 or H == 0:
        return q_rot
    kc, vc = k_cache.select(1, pos), v_cache.select(1, pos)  # (B, H, D) views at the write slot
    if kc.stride(-1) != 1 or vc.stride(-1) != 1:
        raise ValueError("the KV caches need a contiguous head dim")
    if not (raw_k.is_contiguous() and raw_v.is_contiguous()):
        raise ValueError("the raw states are advanced in place and must be contiguous")
    cos = cos.contiguous()
    sin = sin.contiguous()
    decode_kernel[(B, H)](
        q, q_rot, k_new.contiguous(), v_new.contiguous(), w_k.contiguous(), w_v.contiguous(),
        raw_k, raw_v, cos, sin, kc, vc,
        H, D, D // 2, (cos.stride(0) if cos.shape[0] > 1 else 0),
        kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1),
        REP=q.shape[2] // H, WKN=w_k.shape[1], WVN=w_v.shape[1],
        BLOCK_H=triton.next_power_of_2(max(D // 2, 1)), BLOCK_D=triton.next_power_of_2(max(D, 1)),
    )
    return q_rot


@_shift_rope_decode_op.register_fake
def _(q, k_new, v_new, w_k, w_v, raw_k, raw_v, cos, sin, k_cache, v_cache, pos):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------
# public wrappers


def _fp64(*ts) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in ts)


def kv_shift(x: Tensor, weight: Tensor, *, cu_seqlens: Optional[Tensor] = None,
             prev: Optional[Tensor] = None) -> Tensor:
    """x (B, T, H, D) or packed (N, H, D) with cu_seqlens; weight (H, W); prev (B, W-1, H, D)."""
    if _fp64(x, weight, prev):
        return naive.shift_padded(x, weight, prev) if cu_seqlens is None else naive.shift_varlen(
            x, weight, cu_seqlens, prev)
    return shift_fwd(x, weight, prev, cu_seqlens, None, None)


def shift_rope(k: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, *, cu_seqlens: Optional[Tensor] = None,
               prev: Optional[Tensor] = None) -> Tensor:
    """RoPE(kv_shift(k)) in one pass; cos/sin (B or 1, T, D/2), or (N, D/2) when packed."""
    if _fp64(k, weight, prev):
        return naive.shift_rope(k, weight, cos, sin, cu_seqlens=cu_seqlens, prev=prev)
    return shift_fwd(k, weight, prev, cu_seqlens, cos, sin)


def _advance_naive(raw: Tensor, new: Tensor) -> None:
    if raw.shape[1]:
        raw.copy_(torch.cat([raw[:, 1:], new.to(raw.dtype)], 1))


def shift_rope_decode_naive(q: Tensor, k_new: Tensor, v_new: Tensor, w_k: Tensor, w_v: Tensor, raw_k: Tensor,
                            raw_v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                            pos: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Reference decode step (see `shift_rope_decode`)."""
    k_hat = apply_rope(naive.shift_padded(k_new, w_k, raw_k), cos, sin)  # (B, 1, H, D)
    v_hat = naive.shift_padded(v_new, w_v, raw_v)
    k_cache[:, pos : pos + 1].copy_(k_hat)
    v_cache[:, pos : pos + 1].copy_(v_hat)
    _advance_naive(raw_k, k_new)
    _advance_naive(raw_v, v_new)
    return apply_rope(q, cos, sin), raw_k, raw_v


def shift_rope_decode(q: Tensor, k_new: Tensor, v_new: Tensor, w_k: Tensor, w_v: Tensor, raw_k: Tensor,
                      raw_v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                      pos: int) -> Tuple[Tensor, Tensor, Tensor]:
    """One decode step for a batch of single tokens, one kernel launch for the whole layer.

    q (B, 1, H_q, D) raw queries, H_q a multiple of H; k_new, v_new (B, 1, H, D); w_k (H, Wk), w_v (H, Wv);
    raw_k (B, Wk-1, H, D), raw_v (B, Wv-1, H, D) (the last raw tokens, oldest first, zeros before the
    sequence start; contiguous); cos/sin (B or 1, 1, D/2); k_cache, v_cache (B, S, H, D). Writes
    k_cache[:, pos] = RoPE(shift(k)), v_cache[:, pos] = shift(v), advances raw_k/raw_v IN PLACE
    (raw[:, 1:] followed by the new token) and returns (RoPE(q), raw_k, raw_v). With Wk = Wv = 1
    (no shift, empty raw states) it is the RoPE + cache append of a vanilla layer.
    """
    if _fp64(q, k_new, v_new, w_k, w_v, raw_k, raw_v, k_cache, v_cache):
        return shift_rope_decode_naive(q, k_new, v_new, w_k, w_v, raw_k, raw_v, cos, sin, k_cache, v_cache, pos)
    q_rot = _shift_rope_decode_op(q, k_new, v_new, w_k, w_v, raw_k, raw_v, cos, sin, k_cache, v_cache, pos)
    return q_rot, raw_k, raw_v


__all__ = ["is_available", "kv_shift", "shift_rope", "shift_rope_decode", "shift_rope_decode_naive",
           "shift_fwd", "shift_bwd", "launch_shift_fwd", "launch_shift_bwd", "launch_shift_kv_fwd",
           "launch_shift_kv_bwd"]
