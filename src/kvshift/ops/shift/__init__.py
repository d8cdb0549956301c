"""Public KV-shift op with argument checks and backend dispatch.

`kv_shift(x, weight, *, cu_seqlens=None, prev=None, impl="auto")`
`shift_rope(k, weight, cos, sin, *, cu_seqlens=None, prev=None, impl="auto")`: RoPE(kv_shift(k)),
fused into one pass on the Triton path (the K path of an attention layer).

- x: (B, T, H, D), or packed (N, H, D) with `cu_seqlens` (int32, B+1 offsets).
- weight: (H, W), W = window + 1; weight[:, 0] multiplies the current token, weight[:, j] the
  token j positions earlier. Positions before a sequence's or document's start contribute zero.
- prev: optional (B, W-1, H, D) raw tokens just before x[:, 0] (oldest first).
- impl: "auto" (fused Triton kernel on CUDA when available, else naive), "naive", "triton".
"""

from __future__ import annotations

import torch

from . import naive
from .impl import IMPLS, triton_available, use_triton

_FLOAT = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def check_cu_seqlens(cu_seqlens: torch.Tensor, n: int, *, name: str = "cu_seqlens") -> None:
    """Validate flash-attn style offsets: int32, 1-D, starts at 0, non-decreasing, ends at n."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if torch.compiler.is_compiling():
        return  # value checks need a host sync; done once outside the compiled region
    vals = cu_seqlens.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {vals[0]}")
    if any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {vals}")
    if vals[-1] != n:
        raise ValueError(f"{name} must end at the number of packed tokens {n}, got {vals[-1]}")


def _check(x, weight, cu_seqlens, prev, impl):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT:
        raise ValueError(f"x must be a floating tensor (fp64/fp32/bf16/fp16), got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(weight, torch.Tensor) or weight.dtype not in _FLOAT:
        raise ValueError("weight must be a floating tensor of shape (H, W)")
    if weight.dim() != 2 or not 1 <= weight.shape[1] <= 4:
        raise ValueError(f"weight must have shape (H, W) with 1 <= W <= 4, got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if cu_seqlens is None:
        if x.dim() != 4:
            raise ValueError(f"x must be (B, T, H, D) without cu_seqlens, got shape {tuple(x.shape)}")
        B, H = x.shape[0], x.shape[2]
    else:
        if x.dim() != 3:
            raise ValueError(f"x must be packed (N, H, D) with cu_seqlens, got shape {tuple(x.shape)}")
        if cu_seqlens.device != x.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but x is on {x.device}")
        check_cu_seqlens(cu_seqlens, x.shape[0])
        B, H = cu_seqlens.numel() - 1, x.shape[1]
    if weight.shape[0] != H:
        raise ValueError(f"weight has {weight.shape[0]} heads but x has {H}")
    W = weight.shape[1]
    if prev is not None:
        want = (B, W - 1, H, x.shape[-1])
        if not isinstance(prev, torch.Tensor) or tuple(prev.shape) != want:
            raise ValueError(f"prev must have shape (B, W-1, H, D) = {want}, got "
                             f"{tuple(getattr(prev, 'shape', ()))}")
        if prev.device != x.device:
            raise ValueError(f"prev is on {prev.device} but x is on {x.device}")
        if prev.dtype not in _FLOAT:
            raise ValueError(f"prev must be floating, got {prev.dtype}")


def kv_shift(x: torch.Tensor, weight: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
             prev: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """Causal per-head mix of each token with the W-1 tokens before it (see module docstring)."""
    _check(x, weight, cu_seqlens, prev, impl)
    return dispatch_shift(x, weight, cu_seqlens, prev, impl)


def dispatch_shift(x, weight, cu_seqlens, prev, impl):
    """`kv_shift` without the argument checks, for callers that built valid inputs themselves (the
    model validates cu_seqlens once per forward, not once per layer)."""
    if use_triton(impl, x):
        from . import triton as tk  # triton is an optional dependency (the triton extra)
        return tk.kv_shift(x, weight, cu_seqlens=cu_seqlens, prev=prev)
    if cu_seqlens is None:
        return naive.shift_padded(x, weight, prev)
    return naive.shift_varlen(x, weight, cu_seqlens, prev)


def _check_rope(k, cos, sin, cu_seqlens):
    D = k.shape[-1]
    if D % 2:
        raise ValueError(f"RoPE needs an even head dim, got k.shape[-1] = {D}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor")
        if t.device != k.device:
            raise ValueError(f"{name} is on {t.device} but k is on {k.device}")
        if cu_seqlens is None:
            B, T = k.shape[0], k.shape[1]
            if t.dim() != 3 or t.shape[0] not in (1, B) or tuple(t.shape[1:]) != (T, D // 2):
                raise ValueError(f"{name} must have shape (B or 1, T, D/2) = ({B} or 1, {T}, {D // 2}), "
                                 f"got {tuple(t.shape)}")
        elif tuple(t.shape) != (k.shape[0], D // 2):
            raise ValueError(f"{name} must have shape (N, D/2) = {(k.shape[0], D // 2)} for packed k, "
                             f"got {tuple(t.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")


def shift_rope(k: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
               cu_seqlens: torch.Tensor | None = None, prev: torch.Tensor | None = None,
               impl: str = "auto") -> torch.Tensor:
    """RoPE applied to the shifted keys (the paper's order), fused in one pass on the Triton path.

    k (B, T, H, D) with cos/sin (B or 1, T, D/2), or packed k (N, H, D) with cos/sin (N, D/2) and
    cu_seqlens; weight, prev and impl as in `kv_shift`.
    """
    _check(k, weight, cu_seqlens, prev, impl)
    _check_rope(k, cos, sin, cu_seqlens)
    return dispatch_shift_rope(k, weight, cos, sin, cu_seqlens, prev, impl)


def dispatch_shift_rope(k, weight, cos, sin, cu_seqlens, prev, impl):
    """`shift_rope` without the argument checks (see `dispatch_shift`)."""
    if use_triton(impl, k):
        from . import triton as tk  # triton is an optional dependency (the triton extra)
        return tk.shift_rope(k, weight, cos, sin, cu_seqlens=cu_seqlens, prev=prev)
    return naive.shift_rope(k, weight, cos, sin, cu_seqlens=cu_seqlens, prev=prev)


__all__ = ["kv_shift", "shift_rope", "dispatch_shift", "dispatch_shift_rope", "check_cu_seqlens", "triton_available",
           "use_triton", "IMPLS", "naive"]
