"""Theorem 2 of the paper as code: one KV-shift attention layer with one head is an induction head.

Construction (the paper's proof): D = d, identity projections, alpha1 = 0, alpha2 = 1 (the key of position
s is x_{s-1}), beta1 = 1, beta2 = 0 (its value is x_s), a temperature 1/sigma on the query, and an ALiBi
penalty m·|L - s| that prefers the most recent match. Reading the output at position L against the
embedding table returns the token that followed the latest earlier occurrence of x_L.
The same layer with vanilla attention (keys x_s) matches x_L with itself and copies x_L back.
"""

from __future__ import annotations

import math

import torch

from kvshift.layers.attention import Attention, AttentionContext


@torch.no_grad()
def induction_head(dim: int, *, attention: str = "kvshift", max_len: int = 512, temperature: float | None = None,
                   alibi_slope: float | None = None) -> Attention:
    """The Theorem 2 layer (attention='kvshift') or the same weights without the shift ('vanilla').

    Logits are x_L·x_{s-1}/sigma - (m/sigma)·(L - s). A match scores 1/sigma; the recency penalty m/sigma
    per position must separate two matches yet stay below 1/sigma over the whole sequence, so by
    default m/sigma = 10 and sigma = 1/(20·max_len).
    """
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    temperature = 1.0 / (20 * max_len) if temperature is None else temperature
    alibi_slope = 10 * temperature if alibi_slope is None else alibi_slope
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    layer = Attention(dim, 1, 1, attention=attention, shift_window=1, position="alibi", shift_impl="naive")
    eye = torch.eye(dim)
    # SDPA divides q·k by sqrt(D); fold sqrt(D)/sigma into Wq so the logit is x_L·x_{s-1}/sigma
    layer.wq.weight.copy_(eye * math.sqrt(dim) / temperature)
    for w in (layer.wk, layer.wv, layer.wo):
        w.weight.copy_(eye)
    if attention == "kvshift":
        layer.shift_k.copy_(torch.tensor([[0.0, 1.0]]))  # alpha1 = 0, alpha2 = 1
        layer.shift_v.copy_(torch.tensor([[1.0, 0.0]]))  # beta1 = 1, beta2 = 0
    layer.alibi_slopes.fill_(alibi_slope / temperature)
    return layer


@torch.no_grad()
def run_induction_head(layer: Attention, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Apply the layer to token sequences (B, L) with an embedding table (V, d); return, at every
    position, the id of the embedding nearest (by dot product) to the layer's output (B, L)."""
    x = embeddings[tokens]  # (B, L, d)
    B, L = tokens.shape
    pos = torch.arange(L).view(1, L).expand(B, L)
    ctx = AttentionContext(distance=(pos.unsqueeze(2) - pos.unsqueeze(1)).float(),
                           mask=torch.ones(L, L, dtype=torch.bool).tril().view(1, 1, L, L))
    out = layer(x, ctx)
    return (out @ embeddings.T).argmax(-1)


def induction_targets(tokens: torch.Tensor) -> torch.Tensor:
    """For each position, the token after the latest earlier occurrence of the current token, or -1."""
    B, L = tokens.shape
    tgt = torch.full_like(tokens, -1)
    for b in range(B):
        last: dict[int, int] = {}
        row = tokens[b].tolist()
        for p, t in enumerate(row):
            if t in last and last[t] + 1 < L:
                tgt[b, p] = row[last[t] + 1]
            last[t] = p
    return tgt


def random_embeddings(vocab_size: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unit-norm Gaussian embeddings: near-orthogonal when dim is large."""
    e = torch.randn(vocab_size, dim, generator=generator)
    return e / e.norm(dim=1, keepdim=True)
