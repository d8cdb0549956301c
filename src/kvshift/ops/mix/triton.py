"""Fused Triton causal mix: forward and backward kernels registered as torch custom ops.

Public entry point (inputs are validated by `kvshift.ops.mix`, not here):
    causal_mix(x, weight, *, cu_seqlens=None, prev=None, residual=False, channel_mask=None)

Per-head weights, the residual and the channel mask are folded into one per-channel fp32 weight
(H, D, W+1) with plain torch ops (`effective_weight`), so autograd maps its gradient back to the
user's weight (summing a head's channels, keeping only masked channels). The fused ops
`kvshift::mix_fwd` and `kvshift::mix_bwd` then run a depthwise causal conv over time; they have
fake and autograd rules, so torch.compile(fullgraph=True) keeps them in the graph. The backward
recomputes the taps from x and prev; fp64 inputs fall back to the naive reference. When the weight needs
no gradient (key offset's and smear's fixed taps), x is not kept for the backward at all: dx and dprev
need only the output gradient and the weight.

This module deliberately does not use `from __future__ import annotations`: custom_op infers its
schema from the real annotations.
"""

import os
from typing import Optional, Tuple

import torch
import triton

from kvshift.ops.shift.triton import search_steps  # the packed layout's binary search, one rule

from . import naive
from .triton_kernels import mix_bwd_kernel, mix_dprev_kernel, mix_fwd_kernel

Tensor = torch.Tensor

__all__ = ["is_available", "causal_mix", "effective_weight", "mix_fwd", "mix_bwd"]

_MAX_PROGRAMS = 1024  # backward programs per launch (over all heads): bounds the dweight partial sums


def is_available() -> bool:
    """Triton imported (it did, or this module would not load) and there is a device to run on."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


def effective_weight(weight: Tensor, H: int, D: int, residual: bool, channel_mask: Optional[Tensor]) -> Tensor:
    """The one per-channel fp32 weight (H, D, W+1) equal to the op with these options.

    Masked-out channels get [1, 0, .., 0] (y = x); masked-in channels the user's weight; residual
    adds 1 to every channel's current-token tap (y = x + mix). Differentiable in `weight`."""
    K = weight.shape[-1]
    w = weight.float()
    w = (w[:, None, :] if w.dim() == 2 else w).expand(H, D, K)  # (H, D, W+1)
    if channel_mask is None:
        keep_x = torch.full((H, D), 1.0 if residual else 0.0, device=w.device)  # (H, D)
    else:
        m = channel_mask.expand(H, D)
        w = torch.where(m[..., None], w, 0.0)
        keep_x = torch.ones(H, D, device=w.device) if residual else (~m).float()
    first = (torch.arange(K, device=w.device) == 0).float()  # (W+1,) one-hot of the current token
    return w + keep_x[..., None] * first


def _rows(x: Tensor, cu_seqlens: Optional[Tensor]):
    """(N, T, B, cu, nsteps): rows of (H, D); packed: T = 0, cu the int32 offsets the kernels binary-search
    (nsteps halvings) for each row's document, so nothing is built per call."""
    if cu_seqlens is None:
        B, T = x.shape[:2]
        return B * T, T, B, None, 1
    cu = cu_seqlens.to(device=x.device, dtype=torch.int32).contiguous()  # (B+1,)
    B = cu.numel() - 1
    return x.shape[0], 0, B, cu, search_steps(B)


def _block_t(block_d: int, N: int) -> int:
    block_t = max(16, min(64, 4096 // block_d))  # about 4096 elements per tile
    return min(block_t, max(16, triton.next_power_of_2(max(N, 1))))


def launch_fwd(x: Tensor, weight: Tensor, prev: Optional[Tensor], cu_seqlens: Optional[Tensor]) -> Tensor:
    """x (B, T, H, D) or (N, H, D); weight (H, D, W+1) fp32; prev (B, W, H, D) or None -> y like x."""
    x = x.contiguous()
    w = weight.contiguous()
    H, D = x.shape[-2:]
    y = torch.empty_like(x)
    N, T, B, cu, nsteps = _rows(x, cu_seqlens)
    if N == 0 or H == 0 or D == 0:
        return y
    W = w.shape[-1] - 1
    block_d = triton.next_power_of_2(D)
    block_t = _block_t(block_d, N)
    varlen = cu_seqlens is not None
    mix_fwd_kernel[(triton.cdiv(N, block_t), H)](
        x, w, x if prev is None else prev.contiguous(), cu if varlen else x, B if varlen else 0, y,
        N, T, H, D, W=W, HAS_PREV=prev is not None, VARLEN=varlen, BLOCK_T=block_t, BLOCK_D=block_d, NSTEP=nsteps,
    )
    return y


def launch_bwd(dy: Tensor, x: Optional[Tensor], weight: Tensor, prev: Optional[Tensor],
               cu_seqlens: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight (H, D, W+1), dprev); dprev is an empty (0,) tensor when prev is None. x None: no weight
    gradient (dweight is an empty (0,) tensor) and x is never read."""
    need_dw = x is not None
    dy = dy.contiguous()
    x = x.contiguous() if need_dw else dy  # without dweight the kernel reads no tap of x (or prev)
    w = weight.contiguous()
    H, D = x.shape[-2:]
    W = w.shape[-1] - 1
    N, T, B, cu, nsteps = _rows(x, cu_seqlens)
    varlen = cu_seqlens is not None
    dx = torch.empty_like(x)
    dw = x.new_empty(0, dtype=weight.dtype)
    if N == 0 or H == 0 or D == 0:
        dx = torch.zeros_like(x)
        if need_dw:
            dw = torch.zeros(w.shape, device=w.device, dtype=weight.dtype)
    else:
        block_d = triton.next_power_of_2(D)
        block_t = _block_t(block_d, N)
        nblk = triton.cdiv(N, block_t)
        iters = triton.cdiv(nblk, max(1, _MAX_PROGRAMS // H))  # row blocks per program
        nprog = triton.cdiv(nblk, iters)
        # per-program sums of dweight; without them the kernel gets dx as a placeholder it never touches (an
        # empty CUDA tensor's null pointer is not a safe kernel argument)
        dwp = torch.empty(nprog, H, D, W + 1, device=x.device, dtype=torch.float32) if need_dw else dx
        mix_bwd_kernel[(nprog, H)](
            x, w, x if prev is None or not need_dw else prev.contiguous(), cu if varlen else x,
            B if varlen else 0, dy, dx, dwp, N, T, H, D, iters,
            W=W, HAS_PREV=prev is not None and need_dw, VARLEN=varlen, BLOCK_T=block_t, BLOCK_D=block_d,
            BLOCK_K=triton.next_power_of_2(W + 1), NSTEP=nsteps, NEED_DW=need_dw,
        )
        if need_dw:
            dw = dwp.sum(0).to(weight.dtype)  # fixed-order reduction: deterministic
    if prev is None:
        return dx, dw, x.new_zeros(0)
    if B == 0 or H == 0 or D == 0:
        return dx, dw, torch.zeros(prev.shape, device=prev.device, dtype=prev.dtype)
    dprev = torch.empty(prev.shape, device=prev.device, dtype=prev.dtype)  # (B, W, H, D)
    mix_dprev_kernel[(B, H)](
        w, cu if varlen else x, dy, dprev, T, H, D,
        W=W, VARLEN=varlen, BLOCK_D=triton.next_power_of_2(D),
    )
    return dx, dw, dprev


# ----------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("kvshift::mix_fwd", mutates_args=())
def mix_fwd(x: Tensor, weight: Tensor, prev: Optional[Tensor], cu_seqlens: Optional[Tensor]) -> Tensor:
    """Depthwise causal mix of x with the per-channel weight (H, D, W+1); same shape and dtype as x."""
    return launch_fwd(x, weight, prev, cu_seqlens)


@mix_fwd.register_fake
def _(x, weight, prev, cu_seqlens):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("kvshift::mix_bwd", mutates_args=())
def mix_bwd(dy: Tensor, x: Optional[Tensor], weight: Tensor, prev: Optional[Tensor],
            cu_seqlens: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dprev); dprev is an empty (0,) tensor when prev is None, dweight when x is None."""
    return launch_bwd(dy, x, weight, prev, cu_seqlens)


@mix_bwd.register_fake
def _(dy, x, weight, prev, cu_seqlens):
    ref = dy if x is None else x  # dx takes x's dtype (dy's when there is no x), as launch_bwd's
    dprev = ref.new_empty(0) if prev is None else torch.empty_like(prev, memory_format=torch.contiguous_format)
    dw = (weight.new_empty(0) if x is None else torch.empty_like(weight, memory_format=torch.contiguous_format))
    return torch.empty_like(ref, memory_format=torch.contiguous_format), dw, dprev


def _setup_context(ctx, inputs, output):
    x, weight, prev, cu_seqlens = inputs
    ctx.has_prev = prev is not None
    ctx.need_dw = ctx.needs_input_grad[1]
    # a constant weight needs no taps of x in the backward: x is not kept (prev only for dprev's shape)
    ctx.save_for_backward(x if ctx.need_dw else None, weight, prev, cu_seqlens)


def _backward(ctx, dy):
    x, weight, prev, cu_seqlens = ctx.saved_tensors
    dx, dw, dprev = mix_bwd(dy, x, weight, prev, cu_seqlens)
    return dx, (dw if ctx.need_dw else None), (dprev if ctx.has_prev else None), None


mix_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# public wrapper


def causal_mix(x: Tensor, weight: Tensor, *, cu_seqlens: Optional[Tensor] = None, prev: Optional[Tensor] = None,
               residual: bool = False, channel_mask: Optional[Tensor] = None) -> Tensor:
    """x (B, T, H, D) or packed (N, H, D) with cu_seqlens; weight (H, W+1) or (H, D, W+1);
    prev (B, W, H, D); channel_mask bool (H, D) or (D,). Same contract as the naive op."""
    if any(t is not None and t.dtype == torch.float64 for t in (x, weight, prev)):
        return naive.causal_mix(x, weight, cu_seqlens=cu_seqlens, prev=prev, residual=residual,
                                channel_mask=channel_mask)
    H, D = x.shape[-2:]
    return mix_fwd(x, effective_weight(weight, H, D, residual, channel_mask), prev, cu_seqlens)
