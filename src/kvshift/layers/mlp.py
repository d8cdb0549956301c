"""The feed-forward blocks, picked by a string: Llama's SwiGLU or GPT-2's GELU MLP.

Neither has biases (the models here have none anywhere). Both name their output projection `w2`: the
initialisation scales every residual-stream output (`wo`, `w2`) by 1/sqrt(2·n_layers). `mixer` (None, or
Canon position D set by the model: kvshift.layers.mixers) mixes the pre-activations over time; forward's
`ctx` (the forward's AttentionContext) is what it needs.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

MLPS = ("swiglu", "gelu")


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): three matrices, 3·dim·hidden parameters."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down
        self.mixer: nn.Module | None = None

    def forward(self, x, ctx=None):
        a, b = self.w1(x), self.w3(x)
        if self.mixer is not None:
            a, b = self.mixer(ctx, a, b)
        return self.w2(F.silu(a) * b)


class GeluMLP(nn.Module):
    """GPT-2's MLP without biases: w2(gelu_tanh(w1 x)), two matrices, 2·dim·hidden parameters."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down
        self.mixer: nn.Module | None = None

    def forward(self, x, ctx=None):
        a = self.w1(x)
        if self.mixer is not None:
            (a,) = self.mixer(ctx, a)
        return self.w2(F.gelu(a, approximate="tanh"))


def make_mlp(kind: str, dim: int, hidden: int) -> nn.Module:
    """The feed-forward block of `kind` (one of MLPS)."""
    if kind == "swiglu":
        return SwiGLU(dim, hidden)
    if kind == "gelu":
        return GeluMLP(dim, hidden)
    raise ValueError(f"mlp must be one of {MLPS}, got {kind!r}")
