"""Triton kernels for the causal mix (a depthwise causal conv over time): forward, backward, dprev.

The kernels see one per-channel fp32 weight WT (H, D, K), K = W + 1 taps, column 0 = the current
token; the wrapper folds per-head weights, the residual and the channel mask into it. Every tensor
is contiguous; tokens are flattened to rows, so a padded (B, T, H, D) input is read as (B*T, H, D)
rows with pos = row % T, doc = row // T, and a packed (N, H, D) input reads pos/doc from two
precomputed int32 (N,) arrays. A program owns BLOCK_T rows of one head and all D channels.

    y[t] = sum_j WT[h, :, j] * x[t - j]     x[t - j] = 0 when pos[t] < j, or prev[doc, W+pos-j] if given

Everything accumulates in fp32. The weight gradient is written as per-program partial sums
(n_programs, H, D, K) that the caller reduces in a fixed order, so the backward is deterministic.
"""

import triton
import triton.language as tl

# a program's rows and their (position, document), a document's end, a tap: one definition each
from kvshift.ops.shift.triton_kernels import _doc_end, _program_rows, pos_doc, tap


@triton.jit
def _load_weight(WT, h, cols, mask_d, D, j: tl.constexpr, K: tl.constexpr):
    """fp32 [BLOCK_D] weights of tap j for head h."""
    return tl.load(WT + (h * D + cols) * K + j, mask=mask_d, other=0.0)


@triton.jit
def mix_fwd_kernel(X, WT, PREV, CU, NDOC, Y, N, T, H, D,
                   W: tl.constexpr, HAS_PREV: tl.constexpr, VARLEN: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NSTEP: tl.constexpr):
    pid, h, row, mask_t, p, b = _program_rows(CU, NDOC, N, T, VARLEN, BLOCK_T, NSTEP)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(W + 1):
        wj = _load_weight(WT, h, cols, mask_d, D, j, W + 1)
        acc += wj[None, :] * tap(X, PREV, row, p, b, h, cols, mask_t, mask_d, H, D, j, W + 1, HAS_PREV)
    yoff = ((row.to(tl.int64) * H + h) * D)[:, None] + cols[None, :]
    tl.store(Y + yoff, acc.to(Y.dtype.element_ty), mask=mask_t[:, None] & mask_d[None, :])


@triton.jit
def mix_bwd_kernel(X, WT, PREV, CU, NDOC, DY, DX, DWP, N, T, H, D, ITERS,
                   W: tl.constexpr, HAS_PREV: tl.constexpr, VARLEN: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                   NSTEP: tl.constexpr, NEED_DW: tl.constexpr):
    """Program (pid, h) owns ITERS consecutive row blocks of head h:
    dx[s] = sum_j WT[h, :, j] g[s + j] (s + j inside s's document);
    DWP[pid, h, :, j] = sum over its rows t of g[t] * x[t - j] (NEED_DW only: without it X, PREV and DWP
    are never read or written, so a constant weight's caller need not keep x)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    kk = tl.arange(0, BLOCK_K)
    dw = tl.zeros([BLOCK_D, BLOCK_K], dtype=tl.float32)
    it = 0
    while it < ITERS:  # a while loop: the interpreter cannot index range() with a scalar argument
        row = (pid * ITERS + it) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = row < N
        p, b = pos_doc(row, mask_t, CU, NDOC, T, VARLEN, NSTEP)
        end = _doc_end(CU, b, mask_t, T, VARLEN)  # exclusive end row of the document
        m = mask_t[:, None] & mask_d[None, :]
        off = ((row.to(tl.int64) * H + h) * D)[:, None] + cols[None, :]
        g = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
        dx = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(W + 1):
            wj = _load_weight(WT, h, cols, mask_d, D, j, W + 1)
            if NEED_DW:
                part = tl.sum(g * tap(X, PREV, row, p, b, h, cols, mask_t, mask_d, H, D, j, W + 1, HAS_PREV), 0)
                dw += tl.where(kk[None, :] == j, part[:, None], 0.0)
            if j == 0:
                dx += wj[None, :] * g
            else:
                mr = (mask_t & (row + j < end))[:, None] & mask_d[None, :]
                dx += wj[None, :] * tl.load(DY + off + j * H * D, mask=mr, other=0.0).to(tl.float32)
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=m)
        it += 1
    if NEED_DW:
        doff = ((pid * H + h) * D + cols)[:, None] * (W + 1) + kk[None, :]
        tl.store(DWP + doff, dw, mask=mask_d[:, None] & (kk < W + 1)[None, :])


@triton.jit
def mix_dprev_kernel(WT, CU, DY, DPREV, T, H, D,
                     W: tl.constexpr, VARLEN: tl.constexpr, BLOCK_D: tl.constexpr):
    """dprev[b, i] = sum_j WT[h, :, j] g[start_b + q], q = i - W + j in [0, L_b). One program per (b, h)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    if VARLEN:
        start = tl.load(CU + b).to(tl.int64)
        length = tl.load(CU + b + 1).to(tl.int64) - start
    else:
        start = b.to(tl.int64) * T
        length = T
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    for i in tl.static_range(W):
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(1, W + 1):
            if i - W + j >= 0:
                wj = _load_weight(WT, h, cols, mask_d, D, j, W + 1)
                goff = ((start + (i - W + j)) * H + h) * D + cols
                acc += wj * tl.load(DY + goff, mask=mask_d & (i - W + j < length), other=0.0).to(tl.float32)
        off = ((b.to(tl.int64) * W + i) * H + h) * D + cols
        tl.store(DPREV + off, acc.to(DPREV.dtype.element_ty), mask=mask_d)
