"""Theorem 3 loss landscape (paper Sec. 3.1 / App. C).

In the simplified setting of Theorem 3 (one KV-shifting layer, tied i.i.d. Gaussian embeddings,
W = I, vocabulary T, length T + 1, one repeated token, loss on the last token, d -> inf), the loss of
the shift coefficients is, with ``OT`` standing for the O(T) terms:

    S  = e^{α2} + 2 e^{α1} + OT,      a1 = e^{α1} / S,      a2 = e^{α2} / S
    n  = exp(a2·β1 + β2/S)
    L  = -log( n / (n + 2·exp(β1/S + β2·a2) + exp(2·a1·β1 + a2·β2) + OT) )

The same ``OT`` value is used for both O(T) terms (in S and in the denominator), as the paper writes
a single O(T). The induction solution is (α1, α2, β1, β2) = (0, 1, 1, 0). ``landscape_grid`` gives
the constrained landscape over (α1, β1) ∈ [0, 1]² with α2 = 1 − α1, β2 = 1 − β1 (Fig. 2).
"""

from __future__ import annotations

import torch

from kvshift.tasks.common import check_int

__all__ = ["loss", "landscape_grid"]


def _as_tensor(x, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    return torch.tensor(float(x), dtype=dtype)


def loss(alpha1, alpha2, beta1, beta2, OT=0.0) -> torch.Tensor:
    """Theorem 3 loss; arguments broadcast; differentiable in all of them (and in OT)."""
    like = next((v for v in (alpha1, alpha2, beta1, beta2, OT) if isinstance(v, torch.Tensor)), None)
    a1_, a2_, b1, b2, ot = (_as_tensor(v, like) for v in (alpha1, alpha2, beta1, beta2, OT))
    if not isinstance(OT, torch.Tensor) and float(OT) < 0:
        raise ValueError(f"OT must be >= 0, got {OT}")
    S = torch.exp(a2_) + 2 * torch.exp(a1_) + ot
    a1 = torch.exp(a1_) / S
    a2 = torch.exp(a2_) / S
    log_num = a2 * b1 + b2 / S
    den = torch.exp(log_num) + 2 * torch.exp(b1 / S + b2 * a2) + torch.exp(2 * a1 * b1 + a2 * b2) + ot
    return torch.log(den) - log_num  # = -log(num / den)


def landscape_grid(n: int = 101, OT: float = 0.0, dtype: torch.dtype = torch.float64):
    """Constrained landscape on an n×n grid over [0, 1]² (meshgrid 'xy' layout, for contour plots).

    Returns (alpha1, beta1, L, dL_dalpha1, dL_dbeta1), each (n, n) with alpha1[i, j] = j/(n-1) and
    beta1[i, j] = i/(n-1); the gradients are total derivatives of L(α1, 1−α1, β1, 1−β1) (autograd).
    Gradient-descent streamlines follow (−dL_dalpha1, −dL_dbeta1).
    """
    n = check_int("n", n, lo=2)
    if float(OT) < 0:
        raise ValueError(f"OT must be >= 0, got {OT}")
    lin = torch.linspace(0.0, 1.0, n, dtype=dtype)
    b1, a1 = torch.meshgrid(lin, lin, indexing="ij")  # rows: β1, columns: α1
    a1 = a1.clone().requires_grad_(True)
    b1 = b1.clone().requires_grad_(True)
    L = loss(a1, 1 - a1, b1, 1 - b1, float(OT))
    ga, gb = torch.autograd.grad(L.sum(), (a1, b1))
    return a1.detach(), b1.detach(), L.detach(), ga, gb
