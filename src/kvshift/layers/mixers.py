"""The family of short causal mixers as model options (`ModelConfig.mixer`), all on `kvshift.causal_mix`.

Each option composes with every attention kind: the q/k/v mixers act on the raw projections, BEFORE
the KV shift (which then mixes the mixed k, v) and before RoPE; pads of a left-padded batch are zeroed
at every mixer's input, so a row's first real token sees zeros before it; packed documents
(cu_seqlens / position_ids) never see another document's tokens. Tensors with many channels (the block
inputs, the MLP's hidden units) go through the op as (B, T, C/d, d) with d = gcd(C, 64), a layout-only
choice (the weight is per channel either way).

- "dconv": Primer's multi-DConv-head attention. A depthwise causal conv of width 3 (the current token
  and the 2 before it, W = 2) on each channel of q, k and v, no residual. Weights: one (channels, 3) per
  stream, initialised to the identity (tap 0 = 1, taps 1, 2 = 0), so the model starts as the model
  without it (Primer learns the conv from its own init; the identity keeps an arm comparable to vanilla).
- "canon": Canon layers (Allen-Zhu 2025). A residual per-channel causal conv h_t <- h_t + sum_{j=0..3}
  w_j * h_{t-j} (W = 3) at the positions of `canon_positions`: A, the attention block's input after its
  norm; B, q, k and v after projection; C, the MLP block's input after its norm; D, inside the MLP on
  the pre-activation outputs (SwiGLU: the gate w1 x and the up w3 x; GELU MLP: w1 x). Weights initialised
  to zeros: the residual makes each Canon layer the identity at init (a model that starts as vanilla),
  and the gradient of a zero weight is not zero (it is dL/dh_t * h_{t-j}), so they learn from step one.
- "keyoffset": the partial key offset of modded-nanogpt, no parameters. In the layers of
  `keyoffset_layers`, half of each key head's channels are taken from the previous token:
  k_t[c] <- k_{t-1}[c] (zeros before a sequence's / document's first token). The channels are those RoPE
  rotates slowest: with the half-split (rotate_half) layout channel c < D/2 pairs with c + D/2 at
  frequency index c, and the slowest are the upper half of the frequency indices, so
  c mod D/2 >= D/2 - D/4 (for D = 64: channels 16..31 and 48..63); rotation pairs stay together. (It acts
  before RoPE, on raw keys like every mixer here; on these near-constant rotations that barely differs
  from offsetting rotated keys.) Implemented as causal_mix with weight [[0, 1]] and that channel mask.
- "smear": gated token smearing on the first block's input (the token embeddings, plus the learned
  position embeddings when position="learned"): e_t <- e_t + lambda * sigmoid(g . e_t) * e_{t-1}, a gate
  vector g (dim) and a scalar lambda. e_{t-1} is the previous raw embedding, taken with causal_mix
  (weight [[0, 1]]). Init: g = 0 (the gate starts at 1/2) and lambda = 0, so the model starts as the
  model without it; lambda gets a gradient at once, g once lambda has moved off 0.

Decoding state: every mixer keeps, per layer, the last W raw inputs of each stream (oldest first, zeros
before a row's start) in the cache's `mixer` dict under a key naming the layer, the position and the
stream ("3.B.k", "0.D.up", "smear"); `KVCache.reorder` reorders it with the rest, so chunked prefill and
beam search stay exact.

Weight decay: `LM.param_groups` puts every mixer parameter (names containing "mixer") in the no-decay
group, like the shift coefficients: decay would pull a dconv toward zeroing q/k/v rather than toward
its identity start, and Canon's and smear's handful of per-channel taps are scales, not matrices.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from kvshift.ops.mix import dispatch_mix

MIXERS = ("none", "dconv", "canon", "keyoffset", "smear")
CANON_POSITIONS = "ABCD"
DCONV_WINDOW = 2  # previous tokens a dconv tap reaches (width 3)
CANON_WINDOW = 3  # previous tokens a Canon layer reaches (width 4)


def channel_layout(channels: int) -> tuple[int, int]:
    """(heads, head dim) view of a flat channel axis for the mix op: head dim = gcd(channels, 64)."""
    d = math.gcd(channels, 64)
    return channels // d, d


def keyoffset_channels(head_dim: int, device=None) -> torch.Tensor:
    """bool (head_dim,): the key channels that take the previous token (see the module docstring)."""
    half = head_dim // 2
    c = torch.arange(head_dim, device=device)
    return (c % half) >= half - half // 2


def mix_in_context(x: torch.Tensor, weight: torch.Tensor, ctx, key: str, *, residual: bool = False,
                   channel_mask: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """causal_mix of x (B, T, H, D) under one forward's context (kvshift.layers.attention.AttentionContext):
    pads zeroed (left padding), packed documents (ctx.cu_seqlens over the flattened B*T tokens), or the
    cache's history under `key` (read as `prev`, then replaced by the last W raw inputs)."""
    B, T, H, D = x.shape
    if ctx.token_valid is not None:
        x = x * ctx.token_valid.view(B, T, 1, 1).to(x.dtype)
    if ctx.cu_seqlens is not None:
        y = dispatch_mix(x.reshape(B * T, H, D), weight, ctx.cu_seqlens, None, residual, channel_mask, impl)
        return y.view(B, T, H, D)
    prev = None
    if ctx.cache is not None:
        W = weight.shape[-1] - 1
        prev = ctx.cache.mixer.get(key)
        prev = None if prev is None else prev.to(x.dtype)
        front = x.new_zeros(B, W, H, D) if prev is None else prev
        ctx.cache.mixer[key] = torch.cat([front, x], 1)[:, -W:].detach()
    return dispatch_mix(x, weight, None, prev, residual, channel_mask, impl)


class ChannelConv(nn.Module):
    """A per-channel causal conv on one or more named streams (dconv: identity init, no residual; Canon:
    zero init, residual). Each stream's weight is a parameter (channels, window+1), current token first;
    `layout` gives each stream's (heads, head dim) view."""

    def __init__(self, key: str, layout: dict[str, tuple[int, int]], window: int, residual: bool,
                 impl: str = "auto"):
        super().__init__()
        self.key, self.window, self.residual, self.impl = key, window, residual, impl
        self.layout = dict(layout)
        for name, (h, d) in self.layout.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(h * d, window + 1)))
        self.reset_mixer()

    @torch.no_grad()
    def reset_mixer(self) -> None:
        for name in self.layout:
            p = getattr(self, name)
            p.zero_()
            if not self.residual:
                p[:, 0] = 1.0

    def forward(self, ctx, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = []
        for name, x in zip(self.layout, xs):
            h, d = self.layout[name]
            w = getattr(self, name).view(h, d, self.window + 1)
            y = mix_in_context(x.reshape(x.shape[0], x.shape[1], h, d), w, ctx, f"{self.key}.{name}",
                               residual=self.residual, impl=self.impl)
            out.append(y.view(x.shape))
        return tuple(out)


class KeyOffset(nn.Module):
    """The partial key offset on (q, k, v): k's slow-RoPE channels from the previous token; no parameters."""

    def __init__(self, key: str, impl: str = "auto"):
        super().__init__()
        self.key, self.impl = key, impl

    def forward(self, ctx, q, k, v):
        H, D = k.shape[-2:]
        w = torch.arange(2, dtype=k.dtype, device=k.device).expand(H, 2)  # [0, 1]: the previous token
        mask = keyoffset_channels(D, k.device)
        return q, mix_in_context(k, w, ctx, self.key, channel_mask=mask, impl=self.impl), v


class Smear(nn.Module):
    """Gated token smearing of the first block's input: e_t + lambda * sigmoid(g . e_t) * e_{t-1}."""

    def __init__(self, dim: int, impl: str = "auto"):
        super().__init__()
        self.dim, self.impl = dim, impl
        self.gate = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.zeros(1))
        self.reset_mixer()

    @torch.no_grad()
    def reset_mixer(self) -> None:
        self.gate.zero_()
        self.scale.zero_()

    def forward(self, ctx, e: torch.Tensor) -> torch.Tensor:
        B, T, C = e.shape
        h, d = channel_layout(C)
        w = torch.arange(2, dtype=e.dtype, device=e.device).expand(h, 2)  # [0, 1]: the previous token
        before = mix_in_context(e.view(B, T, h, d), w, ctx, "smear", impl=self.impl).view(B, T, C)
        g = torch.sigmoid(e @ self.gate.to(e.dtype)).unsqueeze(-1)  # (B, T, 1)
        return e + self.scale.to(e.dtype) * g * before


def keyoffset_in_layer(cfg, layer_idx: int) -> bool:
    return cfg.keyoffset_layers == "all" or layer_idx in cfg.keyoffset_layers


def block_mixers(cfg, layer_idx: int) -> dict[str, nn.Module | None]:
    """The mixers of one block of a ModelConfig `cfg`: "qkv" (in attention, on q, k, v), "A" (the attention
    block's normed input), "C" (the MLP block's normed input), "D" (the MLP's pre-activations)."""
    out: dict[str, nn.Module | None] = {"qkv": None, "A": None, "C": None, "D": None}
    hd, impl = cfg.head_dim, cfg.shift_impl
    qkv = {"q": (cfg.n_heads, hd), "k": (cfg.n_kv_heads, hd), "v": (cfg.n_kv_heads, hd)}
    if cfg.mixer == "dconv":
        out["qkv"] = ChannelConv(f"{layer_idx}.dconv", qkv, DCONV_WINDOW, residual=False, impl=impl)
    elif cfg.mixer == "keyoffset" and keyoffset_in_layer(cfg, layer_idx):
        out["qkv"] = KeyOffset(f"{layer_idx}.keyoffset", impl=impl)
    elif cfg.mixer == "canon":
        hidden = ("gate", "up") if cfg.mlp == "swiglu" else ("up",)
        layouts = {"A": {"x": channel_layout(cfg.dim)}, "B": qkv, "C": {"x": channel_layout(cfg.dim)},
                   "D": {n: channel_layout(cfg.ffn_dim) for n in hidden}}
        for p in cfg.canon_positions:
            m = ChannelConv(f"{layer_idx}.{p}", layouts[p], CANON_WINDOW, residual=True, impl=impl)
            out["qkv" if p == "B" else p] = m
    return out


def mixer_param_count(cfg) -> int:
    """Parameters of the mixers of a ModelConfig `cfg` (all of them non-embedding parameters)."""
    qkv = cfg.head_dim * (cfg.n_heads + 2 * cfg.n_kv_heads)
    if cfg.mixer == "dconv":
        return cfg.n_layers * (DCONV_WINDOW + 1) * qkv
    if cfg.mixer == "canon":
        per = {"A": cfg.dim, "B": qkv, "C": cfg.dim, "D": cfg.ffn_dim * (2 if cfg.mlp == "swiglu" else 1)}
        return cfg.n_layers * (CANON_WINDOW + 1) * sum(per[p] for p in cfg.canon_positions)
    if cfg.mixer == "smear":
        return cfg.dim + 1
    return 0
