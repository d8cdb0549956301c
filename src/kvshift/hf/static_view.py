"""A transformers StaticCache seen by `kvshift.LM` with static shapes: the path torch.compile traces.

`TransformersCacheView` (kvshift.hf.cache_view) reads the cache length and the pad state on the host and
attends over the slots written so far, a length that changes every step: right for a DynamicCache, but a
compiled decode step would break its graph and recompile at every token. On a cache whose every layer is
a (non-sliding) `StaticLayer` this view is used instead, eager and compiled alike, and nothing in it
depends on a tensor's value:

- the first new slot is the cache's own device counter (`get_seq_length()`: StaticLayer's
  `cumulative_length`), read before the first layer writes;
- which slots hold real tokens is a (B, max_cache_len) bool buffer kept on the cache object
  (`_kvshift_slots`, allocated once, then updated in place, never grown), filled from the mask: a 2-D mask of
  the whole allocation (what `KVShiftForCausalLM.create_masks_for_generate` hands generate's compiled
  step: the 2-D mask padded with zeros), of the cached and the new tokens, or of the new tokens only;
- attention reads the whole allocation (`kvshift.layers.stateless` as for any stateless cache) under a
  (B, 1, T, max_cache_len) mask: causal by slot, real slots only; positions, RoPE, ALiBi distances and
  the shift's taps come from the slot mask on the device.

Outside a compiled region the view still checks what it can only check on the host (the allocation
is not exceeded, the mask's width matches the cache, left padding), as the dynamic path does.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import StaticLayer

from kvshift.layers.attention import AttentionContext
from kvshift.layers.stateless import slot_positions

from .cache_view import rotation


def static_length(cache) -> int:
    """The allocation length of a cache every layer of which is a full (non-sliding) StaticLayer; 0 for any
    other cache (those take `TransformersCacheView`)."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(isinstance(x, StaticLayer) and not getattr(x, "is_sliding", False) for x in layers):
        return 0
    lengths = {int(x.max_cache_len) for x in layers}
    return lengths.pop() if len(lengths) == 1 else 0


def slot_buffer(cache, batch_size: int, length: int, device) -> torch.Tensor:
    """The cache's (B, max_cache_len) real-slot buffer, allocated on first use, all real (slots something
    else wrote are real tokens); slots beyond the current length are masked by the view, never cleared."""
    buf = getattr(cache, "_kvshift_slots", None)
    if buf is None or tuple(buf.shape) != (batch_size, length) or buf.device != torch.device(device):
        buf = torch.ones(batch_size, length, dtype=torch.bool, device=device)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(buf, guard=False)  # written in place: CUDA graphs keep its address
        cache._kvshift_slots = buf
    return buf


class StaticCacheView:
    stateless = True  # Attention.forward reads this cache through kvshift.layers.stateless
    static_shapes = True  # LM._context asks `static_context` for the attention context

    def __init__(self, cache, batch_size: int, n_new: int, attention_mask: torch.Tensor | None, *,
                 head_dim: int, rope_base: float, device: torch.device):
        B, T, L = batch_size, n_new, static_length(cache)
        self.cache, self.head_dim, self.rope_base = cache, head_dim, rope_base
        layer = cache.layers[0]
        if layer.is_initialized and layer.keys.shape[0] != B:
            raise ValueError(f"the cache holds {layer.keys.shape[0]} rows but the input has {B}")
        n = cache.get_seq_length()  # StaticLayer's device counter (a 0 before the first write)
        start = (n.to(device).reshape(()).clone() if isinstance(n, torch.Tensor)
                 else torch.zeros((), dtype=torch.long, device=device))
        W = None if attention_mask is None else attention_mask.shape[-1]
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != B):
            raise ValueError(f"attention_mask must be 2-D (batch={B}, length), got shape "
                             f"{tuple(attention_mask.shape)}")
        if not torch.compiler.is_compiling():
            past = int(start)  # host checks, eager only
            if past + T > L:
                raise ValueError(f"sequence length {past + T} exceeds the cache's max_cache_len {L}")
            if W is not None and W not in (L, T, past + T):
                raise ValueError(f"attention_mask must cover the cached and the new tokens, (B, {past + T}), the "
                                 f"new ones, (B, {T}), or the cache's allocation, (B, {L}); got shape "
                                 f"{tuple(attention_mask.shape)}")
        self.q_slot = start + torch.arange(T, device=device)  # the new tokens' slots
        slots = slot_buffer(cache, B, L, device)
        if W is None or (W == T and W != L):  # the new tokens only: earlier slots as recorded
            new = (torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None
                   else attention_mask.to(device=device, dtype=torch.bool))
            recorded = slots.index_copy(1, self.q_slot, new)
        else:  # from slot 0: the whole allocation, or the cached and the new tokens
            recorded = attention_mask.to(device=device, dtype=torch.bool)
            recorded = torch.cat([recorded, slots[:, W:]], 1) if W < L else recorded
        self.valid = recorded & (torch.arange(L, device=device) < start + T).view(1, L)
        self.token_valid = self.valid.index_select(1, self.q_slot)
        if not torch.compiler.is_compiling():
            # left padding only: once a row has a real token, no pad may follow
            seen_real = self.valid.long().cummax(1).values.bool()
            if bool((seen_real & ~self.valid).index_select(1, self.q_slot).any()):
                raise ValueError("attention_mask must be left-padded: a pad (0) follows a real token")
        slots.copy_(recorded)  # in place, once the input passed the checks
        self._pos = slot_positions(self.valid)

    def static_context(self, model, input_ids: torch.Tensor) -> AttentionContext:
        """The attention context of `model` (a kvshift.LM) for this call: every shape is (B, T, max_cache_len)."""
        cfg = model.config
        B, T = input_ids.shape
        L = self.valid.shape[1]
        kpos = (self.valid.long().cumsum(1) - 1).clamp_min(0)  # each slot's position among its row's real tokens
        qpos = kpos.index_select(1, self.q_slot)
        k_slot, q_slot = torch.arange(L, device=input_ids.device).view(1, L), self.q_slot.view(T, 1)
        allowed = (k_slot <= q_slot).unsqueeze(0) & self.valid.view(B, 1, L)
        allowed = allowed | (k_slot == q_slot).unsqueeze(0)  # pad queries see themselves: no NaN rows
        ctx = AttentionContext(cache=self, mask=allowed.unsqueeze(1), token_valid=self.token_valid, causal=False)
        if cfg.position == "rope":
            ctx.cos, ctx.sin = model._rope(qpos, L - 1, False)
        elif cfg.position == "alibi":
            ctx.distance = (qpos.unsqueeze(2) - kpos.unsqueeze(1)).float()
        elif cfg.position == "learned":
            model._check_positions(qpos, L - 1, False)
            ctx.positions = qpos
        return ctx

    def end(self, token_valid: torch.Tensor) -> None:
        pass  # the transformers cache counts its own slots

    # the interface of the stateless read
    def update(self, layer: int, c_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(c_new.contiguous(), v_new.contiguous(), layer)  # the whole allocation

    def slot_positions(self) -> torch.Tensor:
        return self._pos

    def rotation(self, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return rotation(width, self.head_dim, self.rope_base, device)
