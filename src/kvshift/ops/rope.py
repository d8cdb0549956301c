"""Rotary position embedding (half-split convention of Llama / Hugging Face `rotate_half`).

For head dim D (even), pairs are (i, i + D/2):
    out[..., :D/2] = x1 * cos - x2 * sin
    out[..., D/2:] = x2 * cos + x1 * sin
cos/sin are fp32 of shape (..., T, D/2) broadcastable against x's (B, T, D/2) after the head axis.
"""

from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 100_000.0):
    """positions (..., T) int -> cos, sin (..., T, head_dim // 2), fp32."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    ang = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., T, D/2)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D) with cos/sin (B or 1, T, D/2); or packed x (N, H, D) with cos/sin (N, D/2)."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return out.to(x.dtype)


def apply_rope_pointwise(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         rolled: torch.Tensor | None = None) -> torch.Tensor:
    """`apply_rope` (same shapes, the same fp32 products: equal bit for bit) written without a concatenation,
    for torch.compile: out = x * [c, c] + roll(x, D/2) * [-s, s]. Inductor keeps the inputs of a cat that are
    not trivial loads in their own kernel, so where x is itself computed (the compiled decode step's shifted
    key) apply_rope's cat costs a kernel and a buffer per layer; here the rotation is a pointwise index.
    rolled: roll(x, D/2) computed by the caller (the decode step shifts a rolled copy of the raw window, so no
    element reads another's channel), else rolled here."""
    D = x.shape[-1]
    half = D // 2
    xf = x.float()
    xr = torch.roll(xf, half, dims=-1) if rolled is None else rolled.float()
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    rep = [1] * (c.dim() - 1) + [2]
    sign = torch.where(torch.arange(D, device=x.device) < half, -1.0, 1.0).to(xf.dtype)
    out = xf * c.repeat(rep) + xr * sign * s.repeat(rep)
    return out.to(x.dtype)
