"""Triton kernels for the KV shift (plain and fused with RoPE), forward, backward and decode.

Layout: every tensor is contiguous; tokens are flattened to rows, so a padded (B, T, H, D) input is
read as (B*T, H, D) rows with pos = row % T, doc = row // T, and a packed (N, H, D) input reads
pos/doc by a binary search of cu_seqlens in the kernel. A program owns BLOCK_T rows of one head.

    y[t] = sum_j w[h, j] * x[t - j]       x[t - j] = 0 when pos[t] < j, or prev[doc, W-1+pos-j] if given

With ROPE the D axis is handled as two halves (cols and cols + HALF) and the shifted pair is
rotated before the store; the backward un-rotates the upstream grad (transpose rotation) first.
Everything accumulates in fp32; the weight grad is written as per-program partial sums
(n_blocks, H, W) that the caller reduces, so the backward is deterministic (no atomics).
"""

import triton
import triton.language as tl


@triton.jit
def pos_doc(row, mask_t, CU, NDOC, T, VARLEN: tl.constexpr, NSTEP: tl.constexpr):
    """(position inside its document, document) of each row. Packed: a binary search of CU (NDOC + 1 int32
    offsets) for the first document whose end lies past the row, NSTEP >= bit_length(NDOC) halvings, so
    empty documents are skipped and no (N,) index array is built per call (each would be a launch)."""
    if VARLEN:
        lo = tl.zeros_like(row)
        hi = tl.zeros_like(row) + NDOC
        for _ in tl.static_range(NSTEP):
            live = lo < hi
            mid = (lo + hi) // 2
            end = tl.load(CU + mid + 1, mask=mask_t & live, other=0)
            right = live & (end <= row)
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(live & ~right, mid, hi)
        b = lo
        p = row - tl.load(CU + b, mask=mask_t, other=0)
    else:
        p = row % T
        b = row // T
    return p, b


@triton.jit
def _program_rows(CU, NDOC, N, T, VARLEN: tl.constexpr, BLOCK_T: tl.constexpr, NSTEP: tl.constexpr):
    """A program's (block id, head, rows, row mask, in-document positions, documents): grid (row blocks, heads)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    row = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = row < N
    p, b = pos_doc(row, mask_t, CU, NDOC, T, VARLEN, NSTEP)
    return pid, h, row, mask_t, p, b


@triton.jit
def _cs_offset(row, p, b, stride_cb, stride_ct, VARLEN: tl.constexpr):
    # row offset into cos/sin: packed (N, HALF) by row, padded (B or 1, T, HALF) by (doc, pos)
    if VARLEN:
        off = row.to(tl.int64) * stride_ct
    else:
        off = b.to(tl.int64) * stride_cb + p.to(tl.int64) * stride_ct
    return off


@triton.jit
def tap(X, PREV, row, p, b, h, cols, mask_t, mask_d, H, D,
         j: tl.constexpr, W: tl.constexpr, HAS_PREV: tl.constexpr):
    """fp32 tile [BLOCK_T, BLOCK_D] of x[t - j] (zero before the document start, or prev). W is the number of
    taps including the current token: prev holds the W - 1 tokens before a stream, oldest first."""
    src = (row - j).to(tl.int64)
    m = (mask_t & (p >= j))[:, None] & mask_d[None, :]
    v = tl.load(X + ((src * H + h) * D)[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_PREV:
        if j > 0:
            slot = (W - 1 + p - j).to(tl.int64)  # prev[b] is oldest first; valid where p < j
            mp = (mask_t & (p < j))[:, None] & mask_d[None, :]
            poff = ((b.to(tl.int64) * (W - 1) + slot) * H + h) * D
            v += tl.load(PREV + poff[:, None] + cols[None, :], mask=mp, other=0.0).to(tl.float32)
    return v


@triton.jit
def _fwd_rows(X, WT, PREV, COS, SIN, Y, row, p, b, h, mask_t, H, D, HALF, stride_cb, stride_ct,
              W: tl.constexpr, HAS_PREV: tl.constexpr, VARLEN: tl.constexpr, ROPE: tl.constexpr,
              BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Y[row, h] = (RoPE of) sum_j w[h, j] x[row - j] for one tile of rows of one head."""
    cols = tl.arange(0, BLOCK_D)
    ncol = HALF if ROPE else D  # width of the first column block
    mask_d = cols < ncol
    m = mask_t[:, None] & mask_d[None, :]
    yoff = ((row.to(tl.int64) * H + h) * D)[:, None] + cols[None, :]
    acc1 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(W):
        wj = tl.load(WT + h * W + j).to(tl.float32)
        acc1 += wj * tap(X, PREV, row, p, b, h, cols, mask_t, mask_d, H, D, j, W, HAS_PREV)
        if ROPE:
            acc2 += wj * tap(X, PREV, row, p, b, h, cols + HALF, mask_t, mask_d, H, D, j, W, HAS_PREV)
    if ROPE:
        coff = _cs_offset(row, p, b, stride_cb, stride_ct, VARLEN)[:, None] + cols[None, :]
        c = tl.load(COS + coff, mask=m, other=0.0).to(tl.float32)
        s = tl.load(SIN + coff, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + yoff, (acc1 * c - acc2 * s).to(Y.dtype.element_ty), mask=m)
        tl.store(Y + yoff + HALF, (acc2 * c + acc1 * s).to(Y.dtype.element_ty), mask=m)
    else:
        tl.store(Y + yoff, acc1.to(Y.dtype.element_ty), mask=m)


@triton.jit
def shift_fwd_kernel(X, WT, PREV, CU, NDOC, COS, SIN, Y,
                      N, T, H, D, HALF, stride_cb, stride_ct,
                      W: tl.constexpr, HAS_PREV: tl.constexpr, VARLEN: tl.constexpr,
                      ROPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                      NSTEP: tl.constexpr):
    pid, h, row, mask_t, p, b = _program_rows(CU, NDOC, N, T, VARLEN, BLOCK_T, NSTEP)
    _fwd_rows(X, WT, PREV, COS, SIN, Y, row, p, b, h, mask_t, H, D, HALF, stride_cb, stride_ct,
              W, HAS_PREV, VARLEN, ROPE, BLOCK_T, BLOCK_D)


@triton.jit
def shift_kv_fwd_kernel(K, V, WK, WV, CU, NDOC, COS, SIN, YK, YV,
                         N, T, H, D, HALF, stride_cb, stride_ct,
                         WKN: tl.constexpr, WVN: tl.constexpr, VARLEN: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, NSTEP: tl.constexpr):
    """Both halves of a layer's shift in one launch: YK = RoPE(shift(K)), YV = shift(V) for the same rows and
    KV head (K and V share their shape); the rows' documents are found once."""
    pid, h, row, mask_t, p, b = _program_rows(CU, NDOC, N, T, VARLEN, BLOCK_T, NSTEP)
    _fwd_rows(K, WK, K, COS, SIN, YK, row, p, b, h, mask_t, H, D, HALF, stride_cb, stride_ct,
              WKN, False, VARLEN, True, BLOCK_T, BLOCK_DK)
    _fwd_rows(V, WV, V, COS, SIN, YV, row, p, b, h, mask_t, H, D, HALF, stride_cb, stride_ct,
              WVN, False, VARLEN, False, BLOCK_T, BLOCK_DV)


@triton.jit
def _grad_tile(DY, COS, SIN, r, q, b, h, cols, m_t, mask_d, H, D, HALF, stride_cb, stride_ct,
               VARLEN: tl.constexpr, ROPE: tl.constexpr):
    """Upstream grad w.r.t. the SHIFTED rows r (at in-document position q), un-rotated if ROPE.

    Returns (g1, g2): the first and second column blocks (g2 is zero without ROPE)."""
    m = m_t[:, None] & mask_d[None, :]
    off = ((r.to(tl.int64) * H + h) * D)[:, None] + cols[None, :]
    g1 = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
    if ROPE:
        g2 = tl.load(DY + off + HALF, mask=m, other=0.0).to(tl.float32)
        coff = _cs_offset(r, q, b, stride_cb, stride_ct, VARLEN)[:, None] + cols[None, :]
        c = tl.load(COS + coff, mask=m, other=0.0).to(tl.float32)
        s = tl.load(SIN + coff, mask=m, other=0.0).to(tl.float32)
        u1 = g1 * c + g2 * s  # transpose of [[c, -s], [s, c]]
        u2 = g2 * c - g1 * s
        return u1, u2
    else:
        return g1, tl.zeros_like(g1)


@triton.jit
def _bwd_rows(X, WT, PREV, CU, COS, SIN, DY, DX, DWP, pid, row, p, b, end, h, mask_t, H, D, HALF,
              stride_cb, stride_ct, W: tl.constexpr, HAS_PREV: tl.constexpr, VARLEN: tl.constexpr,
              ROPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, WTOT: tl.constexpr,
              WOFF: tl.constexpr):
    """dx of one tile of rows of one head, and the tile's weight-grad sums into program pid's row of H * WTOT
    sums at H * WOFF + h * W + j: flat, so that each operand's (H, W) block is contiguous after the reduction."""
    cols = tl.arange(0, BLOCK_D)
    ncol = HALF if ROPE else D
    mask_d = cols < ncol
    m = mask_t[:, None] & mask_d[None, :]

    g1, g2 = _grad_tile(DY, COS, SIN, row, p, b, h, cols, mask_t, mask_d, H, D, HALF,
                        stride_cb, stride_ct, VARLEN, ROPE)
    dx1 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    dx2 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(W):
        wj = tl.load(WT + h * W + j).to(tl.float32)
        # weight grad: the block's rows t against their taps x[t - j]
        part = tl.sum(tl.sum(g1 * tap(X, PREV, row, p, b, h, cols, mask_t, mask_d, H, D, j, W, HAS_PREV), 1), 0)
        if ROPE:
            part += tl.sum(tl.sum(
                g2 * tap(X, PREV, row, p, b, h, cols + HALF, mask_t, mask_d, H, D, j, W, HAS_PREV), 1), 0)
        tl.store(DWP + pid * H * WTOT + H * WOFF + h * W + j, part)
        # input grad: rows s feed the later rows s + j of the same document
        if j == 0:
            dx1 += wj * g1
            dx2 += wj * g2
        else:
            r = row + j
            f1, f2 = _grad_tile(DY, COS, SIN, r, p + j, b, h, cols, mask_t & (r < end), mask_d, H, D, HALF,
                                stride_cb, stride_ct, VARLEN, ROPE)
            dx1 += wj * f1
            dx2 += wj * f2
    xoff = ((row.to(tl.int64) * H + h) * D)[:, None] + cols[None, :]
    tl.store(DX + xoff, dx1.to(DX.dtype.element_ty), mask=m)
    if ROPE:
        tl.store(DX + xoff + HALF, dx2.to(DX.dtype.element_ty), mask=m)


@triton.jit
def _doc_end(CU, b, mask_t, T, VARLEN: tl.constexpr):
    if VARLEN:
        end = tl.load(CU + b + 1, mask=mask_t, other=0)  # exclusive end row of the document
    else:
        end = (b + 1) * T
    return end


@triton.jit
def shift_bwd_kernel(X, WT, PREV, CU, NDOC, COS, SIN, DY, DX, DWP,
                      N, T, H, D, HALF, stride_cb, stride_ct,
                      W: tl.constexpr, HAS_PREV: tl.constexpr, VARLEN: tl.constexpr,
                      ROPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                      NSTEP: tl.constexpr):
    """dx[s] = sum_j w[j] g[s+j] (s+j inside s's document); DWP[pid, h, j] = <g[t], x[t-j]> over the block."""
    pid, h, row, mask_t, p, b = _program_rows(CU, NDOC, N, T, VARLEN, BLOCK_T, NSTEP)
    end = _doc_end(CU, b, mask_t, T, VARLEN)
    _bwd_rows(X, WT, PREV, CU, COS, SIN, DY, DX, DWP, pid, row, p, b, end, h, mask_t, H, D, HALF,
              stride_cb, stride_ct, W, HAS_PREV, VARLEN, ROPE, BLOCK_T, BLOCK_D, W, 0)


@triton.jit
def shift_kv_bwd_kernel(K, V, WK, WV, CU, NDOC, COS, SIN, DYK, DYV, DK, DV, DWP,
                         N, T, H, D, HALF, stride_cb, stride_ct,
                         WKN: tl.constexpr, WVN: tl.constexpr, VARLEN: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, NSTEP: tl.constexpr):
    """The backward of shift_kv_fwd_kernel in one launch: dK (through the transposed rotation), dV, and the
    weight-grad sums DWP[pid, :] = (K's (H, WKN) block, then V's (H, WVN) block), flat."""
    pid, h, row, mask_t, p, b = _program_rows(CU, NDOC, N, T, VARLEN, BLOCK_T, NSTEP)
    end = _doc_end(CU, b, mask_t, T, VARLEN)
    _bwd_rows(K, WK, K, CU, COS, SIN, DYK, DK, DWP, pid, row, p, b, end, h, mask_t, H, D, HALF,
              stride_cb, stride_ct, WKN, False, VARLEN, True, BLOCK_T, BLOCK_DK, WKN + WVN, 0)
    _bwd_rows(V, WV, V, CU, COS, SIN, DYV, DV, DWP, pid, row, p, b, end, h, mask_t, H, D, HALF,
              stride_cb, stride_ct, WVN, False, VARLEN, False, BLOCK_T, BLOCK_DV, WKN + WVN, WKN)


@triton.jit
def shift_dprev_kernel(WT, CU, COS, SIN, DY, DPREV, T, H, D, HALF, stride_cb, stride_ct,
                        W: tl.constexpr, VARLEN: tl.constexpr, ROPE: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """dprev[b, i] = sum_j w[j] g[start_b + q], q = i - (W-1) + j in [0, L_b). One program per (b, h)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    if VARLEN:
        start = tl.load(CU + b)
        length = tl.load(CU + b + 1) - start
    else:
        start = b * T
        length = T
    cols = tl.arange(0, BLOCK_D)
    ncol = HALF if ROPE else D
    mask_d = cols < ncol
    one = tl.arange(0, 1)  # 1-row tiles so the row helpers can be reused
    for i in tl.static_range(W - 1):
        acc1 = tl.zeros([1, BLOCK_D], dtype=tl.float32)
        acc2 = tl.zeros([1, BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(1, W):
            if i - (W - 1) + j >= 0:
                q = one * 0 + (i - (W - 1) + j)
                wj = tl.load(WT + h * W + j).to(tl.float32)
                g1, g2 = _grad_tile(DY, COS, SIN, start + q, q, one * 0 + b, h, cols, q < length, mask_d,
                                    H, D, HALF, stride_cb, stride_ct, VARLEN, ROPE)
                acc1 += wj * g1
                acc2 += wj * g2
        off = ((b.to(tl.int64) * (W - 1) + i) * H + h) * D + cols
        tl.store(DPREV + off[None, :], acc1.to(DPREV.dtype.element_ty), mask=mask_d[None, :])
        if ROPE:
            tl.store(DPREV + off[None, :] + HALF, acc2.to(DPREV.dtype.element_ty), mask=mask_d[None, :])


@triton.jit
def _decode_one(XN, RAW, WT, b, h, cols, mask_d, H, D, W: tl.constexpr):
    # shifted new token: w[0] * x_new + sum_{j>=1} w[j] * raw[W-1-j] (raw oldest first)
    xn = tl.load(XN + (b * H + h) * D + cols, mask=mask_d, other=0.0).to(tl.float32)
    acc = tl.load(WT + h * W).to(tl.float32) * xn
    for j in tl.static_range(1, W):
        wj = tl.load(WT + h * W + j).to(tl.float32)
        raw = tl.load(RAW + ((b * (W - 1) + (W - 1 - j)) * H + h) * D + cols, mask=mask_d, other=0.0)
        acc += wj * raw.to(tl.float32)
    return acc


@triton.jit
def _advance_raw(RAW, XN, b, h, dcols, md, H, D, W: tl.constexpr):
    # raw[b] (oldest first, W-1 slots) <- raw[b][1:] followed by the new raw token; every thread moves
    # only its own columns, in order, after the barrier that ends all reads of the old state
    for i in tl.static_range(W - 2):
        x = tl.load(RAW + ((b * (W - 1) + i + 1) * H + h) * D + dcols, mask=md, other=0.0)
        tl.store(RAW + ((b * (W - 1) + i) * H + h) * D + dcols, x, mask=md)
    if W > 1:
        x = tl.load(XN + (b * H + h) * D + dcols, mask=md, other=0.0)
        tl.store(RAW + ((b * (W - 1) + W - 2) * H + h) * D + dcols, x.to(RAW.dtype.element_ty), mask=md)


@triton.jit
def decode_kernel(Q, QO, KN, VN, WK, WV, RAWK, RAWV, COS, SIN, KC, VC, H, D, HALF, stride_cb,
                   skb, skh, svb, svh,
                   REP: tl.constexpr, WKN: tl.constexpr, WVN: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """One program per (b, KV head h): the REP query heads of h rotated into QO, KC[b, h] =
    rope(shift(k)), VC[b, h] = shift(v), then the raw states advanced in place.

    Q/QO (B, H*REP, D) contiguous; KC/VC are the caches' (B, H, D) slices at the write position
    (last dim contiguous); RAWK/RAWV (B, W-1, H, D) contiguous."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    cols = tl.arange(0, BLOCK_H)
    mh = cols < HALF
    c = tl.load(COS + b * stride_cb + cols, mask=mh, other=0.0).to(tl.float32)
    s = tl.load(SIN + b * stride_cb + cols, mask=mh, other=0.0).to(tl.float32)
    for r in tl.static_range(REP):
        qoff = (b * (H * REP) + h * REP + r) * D + cols
        q1 = tl.load(Q + qoff, mask=mh, other=0.0).to(tl.float32)
        q2 = tl.load(Q + qoff + HALF, mask=mh, other=0.0).to(tl.float32)
        tl.store(QO + qoff, (q1 * c - q2 * s).to(QO.dtype.element_ty), mask=mh)
        tl.store(QO + qoff + HALF, (q2 * c + q1 * s).to(QO.dtype.element_ty), mask=mh)
    k1 = _decode_one(KN, RAWK, WK, b, h, cols, mh, H, D, WKN)
    k2 = _decode_one(KN, RAWK, WK, b, h, cols + HALF, mh, H, D, WKN)
    kbase = KC + b * skb + h * skh
    tl.store(kbase + cols, (k1 * c - k2 * s).to(KC.dtype.element_ty), mask=mh)
    tl.store(kbase + cols + HALF, (k2 * c + k1 * s).to(KC.dtype.element_ty), mask=mh)
    dcols = tl.arange(0, BLOCK_D)
    md = dcols < D
    v = _decode_one(VN, RAWV, WV, b, h, dcols, md, H, D, WVN)
    tl.store(VC + b * svb + h * svh + dcols, v.to(VC.dtype.element_ty), mask=md)
    tl.debug_barrier()
    _advance_raw(RAWK, KN, b, h, dcols, md, H, D, WKN)
    _advance_raw(RAWV, VN, b, h, dcols, md, H, D, WVN)
