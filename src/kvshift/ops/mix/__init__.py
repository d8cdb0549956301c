"""Public causal-mix op with argument checks and backend dispatch.

`causal_mix(x, weight, *, cu_seqlens=None, prev=None, residual=False, channel_mask=None, impl="auto")`

One op for the short causal mixers: KV shifting (per-head weight), a depthwise causal conv over
time (per-channel weight: Primer's depthwise conv, Canon layers, short convs), its residual form,
and a mix on some channels only (a partial key offset: weight [[0, 1]] on the masked channels
takes the previous token's value there).

    y[t] = sum_{j=0..W} w[..., j] * x[t - j]       x[t - j] = 0 before the sequence's/document's start
    y = x + y if residual;   y = where(channel_mask, y, x)

- x: (B, T, H, D), or packed (N, H, D) with `cu_seqlens` (int32, B+1 offsets).
- weight: per head (H, W+1) or per channel (H, D, W+1), 1 <= W <= 3; column 0 = the current token.
- prev: optional (B, W, H, D) raw tokens just before x[:, 0] (oldest first, most recent last).
- residual: add x to the mix.
- channel_mask: optional bool (H, D) or (D,): where the mix applies; elsewhere y = x, and those
  channels contribute nothing to the weight's gradient.
- impl: "auto" (fused Triton kernels on CUDA when available, else naive), "naive", "triton".
Per-head weight without residual or mask is exactly `kvshift.ops.shift.kv_shift`.
"""

from __future__ import annotations

import torch

from kvshift.ops.shift import check_cu_seqlens
from kvshift.ops.shift.impl import IMPLS, use_triton

from . import naive

__all__ = ["causal_mix", "dispatch_mix", "naive", "MAX_WINDOW"]

MAX_WINDOW = 3  # previous tokens a weight may reach (W)
_FLOAT = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _check_tensor(name: str, t, x: torch.Tensor, dtypes=_FLOAT) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in dtypes:
        raise ValueError(f"{name} must be a tensor of dtype in {dtypes}, got "
                         f"{getattr(t, 'dtype', type(t).__name__)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check(x, weight, cu_seqlens, prev, residual, channel_mask, impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT:
        raise ValueError(f"x must be a floating tensor (fp64/fp32/bf16/fp16), got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(residual, bool):
        raise ValueError(f"residual must be a bool, got {type(residual).__name__}")
    _check_tensor("weight", weight, x)
    if cu_seqlens is None:
        if x.dim() != 4:
            raise ValueError(f"x must be (B, T, H, D) without cu_seqlens, got shape {tuple(x.shape)}")
        B = x.shape[0]
    else:
        if x.dim() != 3:
            raise ValueError(f"x must be packed (N, H, D) with cu_seqlens, got shape {tuple(x.shape)}")
        if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.device != x.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but x is on {x.device}")
        check_cu_seqlens(cu_seqlens, x.shape[0])
        B = cu_seqlens.numel() - 1
    H, D = x.shape[-2:]
    if weight.dim() not in (2, 3) or tuple(weight.shape[:-1]) not in ((H,), (H, D)):
        raise ValueError(f"weight must have shape (H, W+1) or (H, D, W+1) with H = {H}, D = {D}, "
                         f"got {tuple(weight.shape)}")
    W = weight.shape[-1] - 1
    if not 1 <= W <= MAX_WINDOW:
        raise ValueError(f"weight must have W+1 columns with 1 <= W <= {MAX_WINDOW}, got "
                         f"{weight.shape[-1]} columns (shape {tuple(weight.shape)})")
    if prev is not None:
        _check_tensor("prev", prev, x)
        if tuple(prev.shape) != (B, W, H, D):
            raise ValueError(f"prev must have shape (B, W, H, D) = {(B, W, H, D)}, got {tuple(prev.shape)}")
    if channel_mask is not None:
        _check_tensor("channel_mask", channel_mask, x, dtypes=(torch.bool,))
        if tuple(channel_mask.shape) not in ((H, D), (D,)):
            raise ValueError(f"channel_mask must have shape (H, D) = {(H, D)} or (D,) = {(D,)}, got "
                             f"{tuple(channel_mask.shape)}")


def causal_mix(x: torch.Tensor, weight: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
               prev: torch.Tensor | None = None, residual: bool = False,
               channel_mask: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """Causal mix of each token with the W tokens before it (see the module docstring)."""
    _check(x, weight, cu_seqlens, prev, residual, channel_mask, impl)
    return dispatch_mix(x, weight, cu_seqlens, prev, residual, channel_mask, impl)


def dispatch_mix(x, weight, cu_seqlens, prev, residual, channel_mask, impl):
    """`causal_mix` without the argument checks, for callers that built valid inputs themselves."""
    if use_triton(impl, x):
        from . import triton as tm  # triton is an optional dependency (the triton extra)
        return tm.causal_mix(x, weight, cu_seqlens=cu_seqlens, prev=prev, residual=residual,
                             channel_mask=channel_mask)
    return naive.causal_mix(x, weight, cu_seqlens=cu_seqlens, prev=prev, residual=residual,
                            channel_mask=channel_mask)
