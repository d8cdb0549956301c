"""A transformers `Cache` (DynamicCache, StaticCache, ...) seen by `kvshift.LM` as a stateless cache.

Per layer the transformers cache stores what it stores for any Llama-style model: rotated raw keys
and raw values, (B, H_kv, S, D), appended with `cache.update(key_states, value_states, layer_idx)`.
The KV shift is applied on read (`kvshift.layers.stateless`), so transformers can crop the cache
(assisted generation, prompt lookup), reorder it (beam search) and allocate it statically.

A view lives for one forward call. Which slots hold real tokens comes from generate()'s 2-D
attention mask (B, past + T): left padding, so each row's positions are counted over its real
tokens and its first real token sees zeros before it. The view records that mask on the cache object,
so a later call with a mask of the new tokens only (B, T), or none, still knows the earlier pads.

It reads the cache length and the pad state on the host and attends over the slots written so far: right for a
DynamicCache (beam search, assisted generation, prompt lookup, cropping). A StaticCache is read through
`kvshift.hf.static_view` instead: static shapes and no host reads, what a compiled decode step needs.
"""

from __future__ import annotations

import torch

from kvshift.layers.stateless import rotation_tables, slot_positions

_ROTATIONS: dict = {}


def rotation(width: int, head_dim: int, rope_base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of R_0 .. R_{width-1} (`rotation_tables`), made once per shape and device by an eager call; a
    compiled one that finds none computes them in its graph and stores nothing (a dict changed inside a compiled
    call fails the guards of the graph that changed it: one more compile)."""
    key = (width, head_dim, rope_base, str(device))
    tables = _ROTATIONS.get(key)
    if tables is None:
        tables = rotation_tables(width - 1, head_dim, rope_base, device=device)
        if not torch.compiler.is_compiling():
            _ROTATIONS[key] = tables
    return tables


def cache_length(cache) -> int:
    """Slots already in a transformers cache (StaticCache keeps the count as a tensor)."""
    n = cache.get_seq_length()
    return int(n.item()) if isinstance(n, torch.Tensor) else int(n)


def remembered_valid(cache, batch_size: int, past: int, device) -> torch.Tensor:
    """(B, past): which cached slots hold real tokens, as the earlier forwards on this cache recorded it (a
    cache cropped since keeps its first `past`); all real for a cache none of our forwards has filled."""
    v = getattr(cache, "_kvshift_valid", None)
    if v is None:
        return torch.ones(batch_size, past, dtype=torch.bool, device=device)
    if v.shape[0] != batch_size:
        raise ValueError(f"the cache holds {v.shape[0]} rows but the input has {batch_size}")
    v = v[:, :past].to(device)
    if v.shape[1] < past:  # slots appended by something else: real
        v = torch.cat([v, v.new_ones(batch_size, past - v.shape[1])], 1)
    return v


class TransformersCacheView:
    stateless = True  # Attention.forward reads this cache through kvshift.layers.stateless

    def __init__(self, cache, batch_size: int, n_new: int, attention_mask: torch.Tensor | None, *,
                 head_dim: int, rope_base: float, device: torch.device):
        self.cache = cache
        past = cache_length(cache)
        total = past + n_new
        max_len = min((m for m in (layer.get_max_length() for layer in getattr(cache, "layers", ())
                                   if hasattr(layer, "get_max_length")) if m > 0), default=-1)
        if max_len > 0 and total > max_len:
            raise ValueError(f"sequence length {total} exceeds the cache's max_cache_len {max_len}")
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size):
            raise ValueError(f"attention_mask must be 2-D (batch={batch_size}, length), got shape "
                             f"{tuple(attention_mask.shape)}")
        if attention_mask is not None and attention_mask.shape[1] == total:
            valid = attention_mask.to(device=device, dtype=torch.bool)  # covers the cached slots: authoritative
        elif attention_mask is None or attention_mask.shape[1] == n_new:
            new = (torch.ones(batch_size, n_new, dtype=torch.bool, device=device) if attention_mask is None
                   else attention_mask.to(device=device, dtype=torch.bool))
            valid = torch.cat([remembered_valid(cache, batch_size, past, device), new], 1)
        else:
            raise ValueError(f"attention_mask must cover the cached and the new tokens, (B, {total}) or "
                             f"(B, {n_new}), got shape {tuple(attention_mask.shape)}")
        cache._kvshift_valid = valid  # which slots hold real tokens, for a later call without the full mask
        self.valid = valid
        self.length = past
        self.seen = valid[:, :past].sum(1)
        self.padded = bool((~valid[:, :past]).any()) if past else False
        self.batch_size, self.head_dim, self.rope_base = batch_size, head_dim, rope_base
        self._pos = slot_positions(valid)

    # the interface LM.forward uses
    def begin(self, n_new: int, token_valid: torch.Tensor) -> None:
        if token_valid.shape != (self.batch_size, n_new):
            raise ValueError(f"the new tokens have shape {tuple(token_valid.shape)}, expected {(self.batch_size, n_new)}")

    def end(self, token_valid: torch.Tensor) -> None:
        pass  # the transformers cache counts its own slots

    # the interface of the stateless read
    def update(self, layer: int, c_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.update(c_new.contiguous(), v_new.contiguous(), layer)
        S = self.valid.shape[1]
        return keys[:, :, :S], values[:, :, :S]  # a static cache returns its whole allocation

    def slot_positions(self) -> torch.Tensor:
        return self._pos

    def rotation(self, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return rotation(width, self.head_dim, self.rope_base, device)
