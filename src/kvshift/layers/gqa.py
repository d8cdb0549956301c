"""Grouped-query attention under a mask, without a copy of the cache per query head.

SDPA's flash kernel takes `enable_gqa` but no mask; in torch 2.11 the memory-efficient kernel takes a mask but
no `enable_gqa` (SDPA then falls to its math kernel, which repeats K and V itself). cuDNN's attention takes both.
So a masked GQA decode step (a left-padded batch, an ALiBi bias; the static decode step's slot mask too) can skip
the repeat only where SDPA's dispatcher picks cuDNN for it; elsewhere the caller repeats K and V to every query
head, the one layout every kernel takes. On an H200, at one query token per row against a 16x8k cache of 4 KV
heads (16 query heads of 64), the repeat layout took 896 us per layer call and cuDNN's enable_gqa 44 us.

Only decode steps take it (one query token per row, no autograd: what was measured; a prefill's attention
dwarfs the repeat), and not while torch.compile traces (the dispatcher query is not traceable). The dispatcher
is asked once per call signature: device, dtypes, batch, heads, head dim, the mask's broadcast shape and SDPA's
global state (which backends are enabled, deterministic algorithms), the inputs of its answer apart from the key
length, which grows by one every eager decode step. A key of length 1 is never remembered (cuDNN refuses it).
Should cuDNN refuse a later key length of a remembered signature, SDPA dispatches that call to another backend
that takes masked GQA (its math kernel, when enabled), so a stale answer costs speed, not correctness.
"""

from __future__ import annotations

import warnings

import torch

_CHOICES: dict[tuple, bool] = {}
_MAX_CHOICES = 1024
NATIVE_DEVICES = ("cuda",)  # where the dispatcher is asked (tests widen it to drive the layout on a CPU)


def cudnn_picked(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether SDPA's dispatcher picks cuDNN's attention for (q, k, k, mask, enable_gqa=True): q (B, H, T, D),
    k (B, Hkv, S, D). False off CUDA, and with a warning if the dispatcher raises."""
    if not q.is_cuda:
        return False
    from torch.nn.attention import SDPBackend

    try:
        choice = torch._fused_sdp_choice(q, k, k, mask, 0.0, False, enable_gqa=True)
    except (RuntimeError, TypeError) as e:  # no backend takes it: keep the layout every kernel takes
        warnings.warn(f"SDPA's kernel choice for masked GQA attention failed ({e}); repeating K/V per head",
                      RuntimeWarning, stacklevel=3)
        return False
    return choice == int(SDPBackend.CUDNN_ATTENTION)


def masked_gqa_native(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether a masked GQA call (q (B, H, T, D), k (B, Hkv, S, D), mask broadcastable to (B, H, T, S)) should
    pass K/V as they are with enable_gqa rather than repeated per query head: cuDNN is SDPA's pick for it
    (`cudnn_picked`), remembered per call signature (see the module docstring). Only for one query token per row
    without autograd and outside torch.compile (an eager decode step, what was measured): a prefill's attention
    work dwarfs the repeat, and the training paths run unmasked or packed."""
    B, H, T, D = q.shape
    if q.device.type not in NATIVE_DEVICES or T != 1 or torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        return False
    if k.shape[2] == 1:  # cuDNN refuses a key of length 1: ask, but do not remember it for longer keys
        return cudnn_picked(q, k, mask)
    key = (q.device, q.dtype, mask.dtype, B, H, D, k.shape[1], tuple(mask.shape[:2]), _sdpa_state())
    hit = _CHOICES.get(key)
    if hit is None:
        if len(_CHOICES) >= _MAX_CHOICES:  # a long-lived server with ever new batch sizes: start afresh
            _CHOICES.clear()
        hit = _CHOICES[key] = cudnn_picked(q, k, mask)
    return hit


def _sdpa_state() -> tuple[bool, ...]:
    """SDPA's global state its dispatcher reads (sdpa_kernel contexts and torch.backends.cuda.enable_*_sdp set
    the backend flags)."""
    b = torch.backends.cuda
    return (b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(),
            torch.are_deterministic_algorithms_enabled())
