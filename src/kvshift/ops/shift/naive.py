"""Pure-PyTorch KV shift: the specification every fused kernel is tested against.

    out[t] = sum_j weight[:, j] * x[t - j]        j = 0 .. W-1   (weight[:, 0] is the CURRENT token)

where x[t - j] is zero when t - j lies before the start of t's sequence (or packed document),
unless `prev` supplies the raw tokens just before the start (oldest first).

No in-place slicing: every tap is a functional pad/slice or gather, so the op is deterministic and
differentiable through x, weight and prev.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvshift.ops.rope import apply_rope


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # half-precision inputs are mixed in fp32 and rounded once at the end
    return torch.float64 if dtype == torch.float64 else torch.float32


def shift_padded(x: torch.Tensor, weight: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, T, H, D), weight (H, W), prev (B, W-1, H, D) or None -> (B, T, H, D)."""
    B, T, H, D = x.shape
    W = weight.shape[1]
    ct = _compute_dtype(x.dtype)
    xc = x.to(ct)
    w = weight.to(ct)
    if W > 1:
        if prev is None:
            front = xc.new_zeros(B, W - 1, H, D)
        else:
            front = prev.to(ct)
        xe = torch.cat([front, xc], dim=1)  # (B, W-1+T, H, D)
    else:
        xe = xc
    out = None
    for j in range(W):
        tap = xe[:, W - 1 - j : W - 1 - j + T]  # x[t - j]
        term = tap * w[:, j].view(1, 1, H, 1)
        out = term if out is None else out + term
    return out.to(x.dtype)


def shift_step(x: torch.Tensor, weight: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per row: x (B, 1, H, D), prev (B, W-1, H, D) or None -> (B, 1, H, D) in fp32 (fp64 for fp64),
    NOT rounded to x's dtype, so RoPE after it rounds once, as the fused decode kernel does.

    `shift_padded` for T = 1 written for torch.compile (the compiled decode step): each tap is a plain slice of
    prev, with no concatenation of prev and x. Inductor keeps a cat's inputs as separate buffers when they
    are not trivial loads, which split the shifted-and-rotated key into extra kernels on the GPU."""
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"x must be one token per row (B, 1, H, D), got shape {tuple(x.shape)}")
    W = weight.shape[1]
    ct = _compute_dtype(x.dtype)
    H = x.shape[2]
    out = x.to(ct) * weight[:, 0].to(ct).view(1, 1, H, 1)
    if prev is not None:  # x[t - j] is prev[:, W-1-j]; without prev (a row's first token) the taps are zero
        for j in range(1, W):
            out = out + prev[:, W - 1 - j:W - j].to(ct) * weight[:, j].to(ct).view(1, 1, H, 1)
    return out


def shift_masked(x: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Padded layout where each row may start late (left padding) or hold several documents.

    pos (B, T) int: the token's position inside its own sequence (0 at a document's first token,
    negative for padding). Tap j is used only where pos >= j, so a row's or document's first
    token sees zeros before it. Used by the model for left-padded batches and packed rows.
    """
    B, T, H, D = x.shape
    W = weight.shape[1]
    ct = _compute_dtype(x.dtype)
    xc = x.to(ct)
    w = weight.to(ct)
    out = None
    for j in range(W):
        tap = F.pad(xc, (0, 0, 0, 0, j, 0))[:, :T] if j else xc  # (B, T, H, D), x[t - j]
        keep = (pos >= j).to(ct).view(B, T, 1, 1)
        term = tap * keep * w[:, j].view(1, 1, H, 1)
        out = term if out is None else out + term
    return out.to(x.dtype)


def shift_varlen(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor,
                 prev: torch.Tensor | None = None) -> torch.Tensor:
    """Packed x (N, H, D) with cu_seqlens (B+1,), prev (B, W-1, H, D) or None -> (N, H, D)."""
    N, H, D = x.shape
    W = weight.shape[1]
    B = cu_seqlens.numel() - 1
    ct = _compute_dtype(x.dtype)
    w = weight.to(ct)
    cu = cu_seqlens.to(torch.long)
    lengths = cu[1:] - cu[:-1]
    doc = torch.repeat_interleave(torch.arange(B, device=x.device), lengths, output_size=N)  # (N,)
    start = cu[:-1][doc]  # (N,)
    t = torch.arange(N, device=x.device)
    # source rows: x, then prev flattened (doc-major, oldest first), then one zero row
    parts = [x.to(ct)]
    if prev is not None and W > 1:
        parts.append(prev.to(ct).reshape(B * (W - 1), H, D))
    zero_row = N + (B * (W - 1) if prev is not None and W > 1 else 0)
    parts.append(x.new_zeros(1, H, D, dtype=ct))
    src = torch.cat(parts, dim=0)
    out = None
    for j in range(W):
        s = t - j
        inside = s >= start
        idx = torch.where(inside, s, torch.full_like(s, zero_row))
        if prev is not None and j > 0:
            back = start - s  # 1 .. j tokens before the document start
            from_prev = (~inside) & (back <= W - 1)
            idx = torch.where(from_prev, N + doc * (W - 1) + (W - 1) - back, idx)
        term = src.index_select(0, idx) * w[:, j].view(1, H, 1)
        out = term if out is None else out + term
    return out.to(x.dtype)


def shift_rope(k: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
               cu_seqlens: torch.Tensor | None = None, prev: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for the fused K path: RoPE applied to the shifted raw keys (the paper's order)."""
    shifted = shift_padded(k, weight, prev) if cu_seqlens is None else shift_varlen(k, weight, cu_seqlens, prev)
    return apply_rope(shifted, cos, sin)
