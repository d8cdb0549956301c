"""Pure-PyTorch causal mix: the specification every fused kernel is tested against.

    mix[t] = sum_{j=0..W} w[..., j] * x[t - j]        (w[..., 0] multiplies the CURRENT token)

w is per head (H, W+1) or per channel (H, D, W+1). x[t - j] is zero when t - j lies before the
start of t's sequence (or packed document), unless `prev` supplies the W raw tokens just before
that start (oldest first, most recent last). Then

    y = x + mix            if residual   else   y = mix
    y = where(channel_mask, y, x)        (channels outside the mask pass x through unchanged)

No in-place slicing: every tap is a functional slice or gather, so the op is deterministic and
differentiable through x, weight and prev. Half-precision inputs are mixed in fp32 and rounded once.
"""

from __future__ import annotations

import torch

__all__ = ["causal_mix", "taps_padded", "taps_varlen"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def taps_padded(x: torch.Tensor, W: int, prev: torch.Tensor | None) -> list[torch.Tensor]:
    """x (B, T, H, D), prev (B, W, H, D) or None -> [x[t - j] for j = 0..W], each (B, T, H, D)."""
    B, T, H, D = x.shape
    front = x.new_zeros(B, W, H, D) if prev is None else prev.to(x.dtype)  # (B, W, H, D)
    xe = torch.cat([front, x], dim=1)  # (B, W+T, H, D)
    return [xe[:, W - j : W - j + T] for j in range(W + 1)]


def taps_varlen(x: torch.Tensor, W: int, cu_seqlens: torch.Tensor,
                prev: torch.Tensor | None) -> list[torch.Tensor]:
    """Packed x (N, H, D), cu_seqlens (B+1,), prev (B, W, H, D) or None -> [x[t - j]], each (N, H, D).

    Rows are gathered from one source: x, then prev flattened (document-major, oldest first), then
    a zero row for taps that fall before a document start with no prev."""
    N, H, D = x.shape
    B = cu_seqlens.numel() - 1
    cu = cu_seqlens.to(device=x.device, dtype=torch.long)
    doc = torch.repeat_interleave(torch.arange(B, device=x.device), cu[1:] - cu[:-1], output_size=N)  # (N,)
    start = cu[:-1][doc]  # (N,) first row of each row's document
    t = torch.arange(N, device=x.device)  # (N,)
    parts = [x]
    if prev is not None:
        parts.append(prev.to(x.dtype).reshape(B * W, H, D))
    zero_row = N + (B * W if prev is not None else 0)
    parts.append(x.new_zeros(1, H, D))
    src = torch.cat(parts, dim=0)  # (N [+ B*W] + 1, H, D)
    taps = []
    for j in range(W + 1):
        s = t - j
        idx = torch.where(s >= start, s, torch.full_like(s, zero_row))
        if prev is not None and j > 0:
            back = start - s  # 1..j tokens before the document start: prev slot W - back
            idx = torch.where(s < start, N + doc * W + W - back, idx)
        taps.append(src.index_select(0, idx))
    return taps


def causal_mix(x: torch.Tensor, weight: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
               prev: torch.Tensor | None = None, residual: bool = False,
               channel_mask: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, T, H, D) or packed (N, H, D) with cu_seqlens; weight (H, W+1) or (H, D, W+1);
    prev (B, W, H, D) or None; channel_mask bool (H, D), (D,) or None -> y, same shape and dtype as x."""
    ct = _compute_dtype(x.dtype)
    H, D = x.shape[-2:]
    W = weight.shape[-1] - 1
    w = weight.to(ct)
    if w.dim() == 2:
        w = w[:, None, :]  # (H, 1, W+1): one weight per head and tap, shared by its channels
    xc = x.to(ct)
    taps = taps_padded(xc, W, prev) if cu_seqlens is None else taps_varlen(xc, W, cu_seqlens, prev)
    mix = None
    for j in range(W + 1):
        term = taps[j] * w[..., j]  # (.., H, D) * (H, 1 or D)
        mix = term if mix is None else mix + term
    y = xc + mix if residual else mix
    if channel_mask is not None:
        y = torch.where(channel_mask.expand(H, D), y, xc)
    return y.to(x.dtype)
