"""KV shift + RoPE of the keys + causal attention as ONE autograd op that saves only raw k and v.

    out = shift_attention(q_rot, k, v, w_k, w_v, cos, sin, cu_seqlens=None, max_seqlen=None, impl="auto")

q_rot (B, T, H, D) are the already rotated queries; k, v (B, T, H_kv, D) the RAW key/value
projections; w_k, w_v (H_kv, W) the shift coefficients (current token first); cos/sin the RoPE
tables (B or 1, T, D/2). Packed documents: q_rot/k/v (N, H|H_kv, D), cos/sin (N, D/2) and int32
cu_seqlens; attention and the shift both stop at document starts. Returns the attention output in
q_rot's layout (before the output projection).

Why one op: with the shift and attention as separate ops, autograd keeps the raw k and v (the shift's
backward needs them for the coefficient gradients) AND the shifted k̂, v̂ (attention's backward needs
them): two extra (B, T, H_kv, D) tensors per layer compared with vanilla attention, which keeps only
the rotated k and v. Here the backward recomputes k̂ = RoPE(shift(k)) and v̂ = shift(v) from the saved
raw tensors (one elementwise pass each, the same kernels as the forward) before the attention
backward, so a layer saves exactly what a vanilla layer saves: q_rot, k, v, out, logsumexp.

Backends ("triton"): the Triton shift kernels of `kvshift.ops.shift.triton`, then on CUDA in bf16/fp16
cuDNN's fused attention for dense batches (`aten::_scaled_dot_product_cudnn_attention` and its backward:
the kernels SDPA itself picks on Hopper, GQA native) and PyTorch's flash-attention kernels
(`aten::_flash_attention_forward/_backward`, varlen form) for packed documents or with
backend="flash" (`attention_backend` says which);
on the CPU (TRITON_INTERPRET=1, for tests) the attention part is an exact math implementation (fp32; fp64 for fp64 inputs) of
the same forward/backward, so the recompute and gradient plumbing is tested without a GPU.
"naive" is the reference: naive shift, naive RoPE and plain masked softmax attention, differentiated
by autograd.

This module deliberately does not use `from __future__ import annotations`: custom_op infers its
schema from the real annotations.
"""

import math
from typing import Optional, Tuple

import torch

from . import naive
from .impl import IMPLS, use_triton

Tensor = torch.Tensor
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def flash_supported(q: Tensor) -> bool:
    """True when the CUDA flash kernels take this input (dtype, head dim); the CPU path always runs."""
    if not q.is_cuda:
        return True
    D = q.shape[-1]
    return q.dtype in _FLASH_DTYPES and D % 8 == 0 and D <= 256


def _dense_cu(B: int, T: int, device) -> Tensor:
    return torch.arange(0, (B + 1) * T, T, device=device, dtype=torch.int32)


# ---- the attention part: flash on CUDA, exact math elsewhere ------------------------------------
def _acc(dtype: torch.dtype) -> torch.dtype:
    """The math path's accumulation dtype (and its logsumexp's): fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _math_mask(cu: Tensor, N: int) -> Tensor:
    rows = torch.arange(N, device=cu.device, dtype=torch.int32)
    doc = torch.searchsorted(cu[1:].contiguous(), rows, right=True)
    return (doc[:, None] == doc[None, :]) & (rows[None, :] <= rows[:, None])  # (N, N) query x key


def _math_scores(q: Tensor, k: Tensor, cu: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    H, Hk, acc = q.shape[1], k.shape[1], _acc(q.dtype)
    kf = k.to(acc).repeat_interleave(H // Hk, dim=1)
    s = torch.einsum("nhd,mhd->hnm", q.to(acc), kf) * scale  # (H, N, N)
    mask = _math_mask(cu, q.shape[0])
    return s.masked_fill(~mask, float("-inf")), kf


def _attn_fwd(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float) -> Tuple[Tensor, Tensor]:
    """q (N, H, D), k/v (N, H_kv, D) -> out (N, H, D) in q's dtype, lse (H, N) fp32 (fp64 for fp64 math)."""
    if q.is_cuda:
        out, lse = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale)[:2]
        return out, lse
    s, _ = _math_scores(q, k, cu, scale)
    lse = torch.logsumexp(s, dim=-1)  # (H, N)
    p = torch.exp(s - lse[..., None])
    vf = v.to(p.dtype).repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = torch.einsum("hnm,mhd->nhd", p, vf)
    return out.to(q.dtype).contiguous(), lse


def _attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu: Tensor,
              max_len: int, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    if q.is_cuda:
        rng = torch.zeros(2, dtype=torch.uint64, device=q.device)  # no dropout: the state is unused
        unused = torch.empty(0, device=q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, cu, cu, max_len, max_len, 0.0, True, rng, unused, scale=scale)
        return dq, dk, dv
    H, Hk = q.shape[1], k.shape[1]
    s, kf = _math_scores(q, k, cu, scale)
    p = torch.exp(s - lse[..., None])  # (H, N, N)
    vf = v.to(p.dtype).repeat_interleave(H // Hk, dim=1)
    do = dout.to(p.dtype)
    dv = torch.einsum("hnm,nhd->mhd", p, do)
    dp = torch.einsum("nhd,mhd->hnm", do, vf)
    delta = (do * out.to(p.dtype)).sum(-1).transpose(0, 1)  # (H, N)
    ds = p * (dp - delta[..., None]) * scale
    dq = torch.einsum("hnm,mhd->nhd", ds, kf)
    dk = torch.einsum("hnm,nhd->mhd", ds, q.to(p.dtype))
    N, D = k.shape[0], k.shape[-1]
    dk = dk.view(N, Hk, H // Hk, D).sum(2)
    dv = dv.view(N, Hk, H // Hk, D).sum(2)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


# ---- dense causal attention through cuDNN (what SDPA picks on Hopper) ----------------------------
_LSE_4D: Optional[bool] = None


def _cudnn_lse_4d() -> bool:
    """Whether this torch's cuDNN attention returns logsumexp as (B, H, T, 1) (2.13 does) or
    (B, H, T): asked of its meta kernel once, so the backward hands the tensor back as it came."""
    global _LSE_4D
    if _LSE_4D is None:
        q = torch.empty(1, 1, 8, 64, device="meta", dtype=torch.bfloat16)
        _LSE_4D = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, q, q, None, True, 0.0, True, False, scale=0.125)[1].dim() == 4
    return _LSE_4D


def _cudnn_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """q (B, T, H, D), k/v (B, T, H_kv, D) -> out (B, T, H, D) contiguous, lse (B, H, T) fp32."""
    B, T, H, _ = q.shape
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, True, False, scale=scale)
    return res[0].transpose(1, 2).contiguous(), res[1].reshape(B, H, T)  # no copies: cuDNN writes BTHD


def _cudnn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
               scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    T = q.shape[1]
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    unused = torch.zeros((), dtype=torch.int64, device=q.device)  # dropout's philox state: no dropout here
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        t(dout.contiguous()), t(q), t(k), t(v), t(out), lse.unsqueeze(-1) if _cudnn_lse_4d() else lse,
        unused, unused, None, None, None, T, T, 0.0, True, scale=scale)
    return t(dq).contiguous(), t(dk).contiguous(), t(dv).contiguous()


# read once: dynamo (torch 2.11) breaks the graph on torch.backends.cudnn.is_available() inside a trace
_HAS_CUDNN = torch.backends.cudnn.is_available()
# the CUDA attention kernels of the one op: "auto" = cuDNN for dense batches, flash for packed documents
ATTENTION_BACKENDS = ("auto", "cudnn", "flash")


def attention_backend(q: Tensor, cu_seqlens: Optional[Tensor], choice: str = "auto") -> str:
    """"cudnn" (dense CUDA input: the kernels SDPA picks on Hopper), "flash" (packed documents, or asked
    for) or "math" (CPU). choice: one of ATTENTION_BACKENDS, "auto" | "cudnn" | "flash" (the `backend=`
    of `shift_attention` and `set_fused_attention`). cuDNN takes head dims up to 128 here; larger ones go
    to flash."""
    if choice not in ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {ATTENTION_BACKENDS}, got {choice!r}")
    if not q.is_cuda:
        return "math"
    if cu_seqlens is None and choice != "flash" and _HAS_CUDNN and q.shape[-1] <= 128:
        return "cudnn"
    return "flash"


# ---- the fused op -------------------------------------------------------------------------------
def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _shifted(k: Tensor, v: Tensor, w_k: Tensor, w_v: Tensor, cos: Tensor, sin: Tensor,
             cu_seqlens: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    from .triton import launch_shift_kv_fwd  # triton is an optional dependency (the triton extra)
    return launch_shift_kv_fwd(k, v, w_k, w_v, cu_seqlens, cos, sin)  # K and V in one launch


@torch.library.custom_op("kvshift::shift_attn_fwd", mutates_args=())
def shift_attn_fwd(q: Tensor, k: Tensor, v: Tensor, w_k: Tensor, w_v: Tensor, cos: Tensor, sin: Tensor,
                   cu_seqlens: Optional[Tensor], max_len: int, scale: float,
                   backend: str) -> Tuple[Tensor, Tensor]:
    """(out in q's layout, logsumexp fp32: (B, H, T) for cudnn, else (H, N))."""
    k_hat, v_hat = _shifted(k, v, w_k, w_v, cos, sin, cu_seqlens)
    if backend == "cudnn":
        return _cudnn_fwd(q, k_hat, v_hat, scale)
    qf = _flat(q).contiguous()
    cu = cu_seqlens if cu_seqlens is not None else _dense_cu(q.shape[0], q.shape[1], q.device)
    out, lse = _attn_fwd(qf, _flat(k_hat), _flat(v_hat), cu, max_len, scale)
    return out.view(q.shape), lse


@shift_attn_fwd.register_fake
def _(q, k, v, w_k, w_v, cos, sin, cu_seqlens, max_len, scale, backend):
    N = q.numel() // (q.shape[-1] * q.shape[-2])
    lse = (q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32) if backend == "cudnn"
           else q.new_empty((q.shape[-2], N), dtype=_acc(q.dtype)))
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


@torch.library.custom_op("kvshift::shift_attn_bwd", mutates_args=())
def shift_attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, w_k: Tensor, w_v: Tensor, cos: Tensor,
                   sin: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Optional[Tensor], max_len: int,
                   scale: float, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dw): recompute k̂, v̂ (one launch), attention backward, then the shift backward of K and V
    (one launch and one reduction); dw (H_kv * (W_k + W_v),) fp32 holds both coefficient grads, K's (H_kv, W_k)
    block first, each contiguous (one tensor: a custom op's outputs may not alias each other; the autograd
    backward views the blocks apart, and autograd keeps a contiguous view as .grad without a copy)."""
    from .triton import launch_shift_kv_bwd  # triton is an optional dependency (the triton extra)
    k_hat, v_hat = _shifted(k, v, w_k, w_v, cos, sin, cu_seqlens)
    if backend == "cudnn":
        dq, dk_hat, dv_hat = _cudnn_bwd(dout, q, k_hat, v_hat, out, lse, scale)
    else:
        cu = cu_seqlens if cu_seqlens is not None else _dense_cu(q.shape[0], q.shape[1], q.device)
        dq, dk_hat, dv_hat = _attn_bwd(_flat(dout), _flat(q).contiguous(), _flat(k_hat), _flat(v_hat),
                                       _flat(out), lse, cu, max_len, scale)
    del k_hat, v_hat
    dk, dv, dw = launch_shift_kv_bwd(dk_hat.view(k.shape), dv_hat.view(v.shape), k, v, w_k, w_v, cu_seqlens,
                                     cos, sin)
    return dq.reshape(q.shape).contiguous(), dk, dv, dw


@shift_attn_bwd.register_fake
def _(dout, q, k, v, w_k, w_v, cos, sin, out, lse, cu_seqlens, max_len, scale, backend):
    e = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return e(q), e(k), e(v), w_k.new_empty((w_k.numel() + w_v.numel(),), dtype=torch.float32)


def _setup(ctx, inputs, output):
    q, k, v, w_k, w_v, cos, sin, cu_seqlens, max_len, scale, backend = inputs
    out, lse = output
    ctx.max_len, ctx.scale, ctx.backend = max_len, scale, backend
    ctx.save_for_backward(q, k, v, w_k, w_v, cos, sin, cu_seqlens, out, lse)


def _backward(ctx, dout, dlse):
    q, k, v, w_k, w_v, cos, sin, cu_seqlens, out, lse = ctx.saved_tensors
    dq, dk, dv, dw = shift_attn_bwd(dout, q, k, v, w_k, w_v, cos, sin, out, lse, cu_seqlens,
                                    ctx.max_len, ctx.scale, ctx.backend)
    nk = w_k.numel()  # two contiguous blocks
    dw_k, dw_v = dw[:nk].view(w_k.shape).to(w_k.dtype), dw[nk:].view(w_v.shape).to(w_v.dtype)
    return dq, dk, dv, dw_k, dw_v, None, None, None, None, None, None


shift_attn_fwd.register_autograd(_backward, setup_context=_setup)


# ---- public entry points ------------------------------------------------------------------------
def shift_attention_reference(q_rot: Tensor, k: Tensor, v: Tensor, w_k: Tensor, w_v: Tensor, cos: Tensor,
                              sin: Tensor, *, cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """The naive composition (naive shift + RoPE, masked softmax attention), differentiated by autograd."""
    k_hat = naive.shift_rope(k, w_k, cos, sin, cu_seqlens=cu_seqlens)
    v_hat = naive.shift_padded(v, w_v) if cu_seqlens is None else naive.shift_varlen(v, w_v, cu_seqlens)
    cu = cu_seqlens if cu_seqlens is not None else _dense_cu(q_rot.shape[0], q_rot.shape[1], q_rot.device)
    return masked_attention_reference(_flat(q_rot), _flat(k_hat), _flat(v_hat), cu).view(q_rot.shape)


def masked_attention_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Causal softmax attention within each document of packed q (N, H, D), k/v (N, H_kv, D), masked and
    differentiated by autograd (fp32; fp64 for fp64 inputs): the reference of every attention kernel here."""
    s, _ = _math_scores(q, k, cu_seqlens, 1.0 / math.sqrt(q.shape[-1]))
    p = torch.softmax(s, dim=-1)
    vx = v.to(p.dtype).repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return torch.einsum("hnm,mhd->nhd", p, vx).to(q.dtype)


def shift_attention(q_rot: Tensor, k: Tensor, v: Tensor, w_k: Tensor, w_v: Tensor, cos: Tensor, sin: Tensor, *,
                    cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                    impl: str = "auto", backend: str = "auto") -> Tensor:
    """Causal attention over the KV-shifted keys/values (see the module docstring).

    max_seqlen: the longest document with cu_seqlens (an upper bound is fine; default T or N).
    backend: the CUDA attention kernels, "auto" | "cudnn" | "flash" (`attention_backend`)."""
    packed = cu_seqlens is not None
    if q_rot.dim() != (3 if packed else 4) or k.dim() != q_rot.dim() or v.shape != k.shape:
        raise ValueError(f"q_rot/k/v must be (B, T, H, D) (or packed (N, H, D) with cu_seqlens), got "
                         f"{tuple(q_rot.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q_rot.shape[:-2] != k.shape[:-2] or q_rot.shape[-1] != k.shape[-1] or q_rot.shape[-2] % k.shape[-2]:
        raise ValueError(f"q_rot {tuple(q_rot.shape)} and k {tuple(k.shape)} must share tokens and head dim, "
                         "with a multiple of k's heads")
    for name, w in (("w_k", w_k), ("w_v", w_v)):
        if w.dim() != 2 or w.shape[0] != k.shape[-2]:
            raise ValueError(f"{name} must be (H_kv, W) = ({k.shape[-2]}, W), got {tuple(w.shape)}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    chosen = attention_backend(q_rot, cu_seqlens, backend)  # validates backend first
    if not use_triton(impl, q_rot):
        return shift_attention_reference(q_rot, k, v, w_k, w_v, cos, sin, cu_seqlens=cu_seqlens)
    if not flash_supported(q_rot):
        raise ValueError(f"the fused path needs bf16/fp16 and a head dim that is a multiple of 8 (<= 256) on CUDA, "
                         f"got {q_rot.dtype}, D={q_rot.shape[-1]}; use impl='naive'")
    if packed:
        max_len = int(max_seqlen) if max_seqlen is not None else q_rot.shape[0]
    else:
        max_len = q_rot.shape[1]
    out, _ = shift_attn_fwd(q_rot, k, v, w_k, w_v, cos, sin, cu_seqlens, max_len,
                            1.0 / math.sqrt(q_rot.shape[-1]), chosen)
    return out


__all__ = ["shift_attention", "shift_attention_reference", "flash_supported", "attention_backend",
           "ATTENTION_BACKENDS"]
