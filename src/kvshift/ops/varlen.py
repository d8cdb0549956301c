"""Causal attention over packed documents, for every layer that is not on the one-op shift path.

    out = varlen_attention(q, k, v, cu_seqlens, max_seqlen=None)

q (N, H, D), k/v (N, H_kv, D) over the flattened tokens of a packed batch (already rotated; shifted or
mixed as the layer does it), cu_seqlens int32 (docs + 1,) the document starts; attention is causal
and stops at document starts. GQA is native: H must be a multiple of H_kv, nothing is repeated.

Why: without it a packed batch attends through SDPA with a block-diagonal (B, 1, T, T) mask, which
sends SDPA to its masked kernels (on Hopper cuDNN's with a full mask read), while KV shifting's fused
op runs PyTorch's flash kernels in their varlen form. A vanilla model (or a mixer of the family) would
then pay for a worse kernel, not for the lack of a shift, and a speed comparison between them would
measure the kernels. Here every layer gets the same varlen kernels: `aten::_flash_attention_forward`
and its backward on CUDA (bf16/fp16, head dim a multiple of 8 up to 256), on other devices the exact
fp32 math of `kvshift.ops.shift.attention` (for tests; `Attention` uses this op on CUDA only).

This module deliberately does not use `from __future__ import annotations`: custom_op infers its
schema from the real annotations.
"""

import math
from typing import Optional, Tuple

import torch

from .shift.attention import _acc, _attn_bwd, _attn_fwd, flash_supported, masked_attention_reference

Tensor = torch.Tensor


@torch.library.custom_op("kvshift::varlen_attn_fwd", mutates_args=())
def varlen_attn_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_len: int,
                    scale: float) -> Tuple[Tensor, Tensor]:
    """(out (N, H, D) in q's dtype, logsumexp (H, N): fp32, fp64 for fp64 inputs off CUDA)."""
    return _attn_fwd(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, max_len, scale)


@varlen_attn_fwd.register_fake
def _(q, k, v, cu_seqlens, max_len, scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((q.shape[1], q.shape[0]), dtype=_acc(q.dtype)))


@torch.library.custom_op("kvshift::varlen_attn_bwd", mutates_args=())
def varlen_attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
                    max_len: int, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    return _attn_bwd(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out, lse, cu_seqlens,
                     max_len, scale)


@varlen_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_len, scale):
    e = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return e(q), e(k), e(v)


def _setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_len, scale = inputs
    ctx.max_len, ctx.scale = max_len, scale
    ctx.save_for_backward(q, k, v, cu_seqlens, output[0], output[1])


def _backward(ctx, dout, _dlse):
    q, k, v, cu_seqlens, out, lse = ctx.saved_tensors
    dq, dk, dv = varlen_attn_bwd(dout, q, k, v, out, lse, cu_seqlens, ctx.max_len, ctx.scale)
    return dq, dk, dv, None, None, None


varlen_attn_fwd.register_autograd(_backward, setup_context=_setup)


def varlen_attention_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> Tensor:
    """What `varlen_attention` must equal: `masked_attention_reference`, masked softmax by autograd."""
    return masked_attention_reference(q, k, v, cu_seqlens)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: Optional[int] = None) -> Tensor:
    """Causal attention within each packed document (see the module docstring). max_seqlen: the longest
    document (an upper bound is fine; default N)."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"q/k/v must be packed (N, H, D), k and v alike, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share tokens and head dim, with a "
                         "multiple of k's heads")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be 1-D int32, got {cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    if q.is_cuda and not flash_supported(q):
        raise ValueError(f"the CUDA varlen kernels need bf16/fp16 and a head dim that is a multiple of 8 (<= 256), "
                         f"got {q.dtype}, D={q.shape[-1]}")
    max_len = int(max_seqlen) if max_seqlen is not None else q.shape[0]
    out, _ = varlen_attn_fwd(q, k, v, cu_seqlens, max_len, 1.0 / math.sqrt(q.shape[-1]))
    return out


__all__ = ["varlen_attention", "varlen_attention_reference"]
