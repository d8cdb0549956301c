"""What `LM.forward` keeps of its logits and how `LM.generate` draws the next token from them."""

from __future__ import annotations

import torch


def logits_positions(logits_to_keep, T: int):
    """`LM.forward`'s logits_to_keep as an index over the T positions (None: all of them)."""
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() != 1 or logits_to_keep.dtype.is_floating_point or logits_to_keep.dtype == torch.bool:
            raise ValueError(f"logits_to_keep must be an int or a 1-D integer tensor of positions, got a "
                             f"{logits_to_keep.dtype} tensor of shape {tuple(logits_to_keep.shape)}")
        return logits_to_keep
    if isinstance(logits_to_keep, bool) or not hasattr(logits_to_keep, "__index__") or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 (0 = every position) or a 1-D integer tensor, "
                         f"got {logits_to_keep!r}")
    return None if logits_to_keep == 0 or logits_to_keep >= T else slice(T - logits_to_keep, None)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) fp32 -> (B,) token ids."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).view(-1)
