"""Helpers shared by the synthetic tasks: argument checks, RNG bridging, masked accuracy.

Mask convention used by every task here: ``mask[b, p]`` is True when the token at ``p + 1`` is a
scored target, i.e. the model's output at position ``p`` (which predicts token ``p + 1``) is
counted. The last position is therefore never marked.
"""

from __future__ import annotations

import numpy as np
import torch


def check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """Validate an integer argument; ValueError names the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return value


def check_generator(generator) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


def accuracy(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """Masked next-token accuracy.

    logits (B, T, V) where logits[b, p] predicts tokens[b, p + 1]; tokens (B, T); mask (B, T) bool.
    Returns (correct, total) over positions p < T - 1 with mask[b, p]; ``total == mask.sum()``
    because the last position is never marked by the generators (checked here).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if tokens.shape != logits.shape[:2]:
        raise ValueError(f"tokens shape {tuple(tokens.shape)} does not match logits {tuple(logits.shape[:2])}")
    if mask.shape != tokens.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(tokens.shape)}")
    if mask[:, -1].any():
        raise ValueError("mask marks the last position, which has no next token")
    pred = logits[:, :-1].argmax(dim=-1)  # (B, T-1)
    m = mask[:, :-1]
    correct = int(((pred == tokens[:, 1:]) & m).sum())
    return correct, int(m.sum())
