"""Flash-decoding over a paged standard KV cache, with the KV shift applied on read (Triton).

One query token per sequence (the decode step). The cache is a vanilla one: per physical block,
rotated raw keys c_s = R_s k_s and raw values v_s, layout (n_blocks, block_size, H_kv, D) (vLLM's),
addressed through a block table. For each tile of slots the kernel reads its rows, each through the block
table, and, for taps j = 1..W-1, the rows j slots earlier (at a tile's start, the last rows of the previous
logical block), and forms in registers

    k̂_s = Σ_j α_j [s-j ≥ start] R_j c_{s-j}        v̂_s = Σ_j β_j [s-j ≥ start] v_{s-j}

(R_j: RoPE rotation by j positions, half-split; identity tables for no RoPE), then runs the usual
online softmax. One program serves every query head of a KV head (grouped-query attention reads and shifts
each cached row once, not once per query head), with the scores and outputs as small matmuls; tiles hold at
least 16 slots and may span several blocks. The keys are split over `num_splits` programs per (sequence, KV
head) (split-K "flash decoding"); their partial results are merged with a log-sum-exp in PyTorch.

`start[b]`: the slot of row b's first real token (0 for a plain sequence, the pad count for a
left-padded dense cache): slots before it are masked out of attention, and the shift's taps never
reach before it. `seq_lens[b]`: slots in use, the new token's (already written) row included.

Tested against `kvshift.layers.stateless.read_shifted` under TRITON_INTERPRET=1 (tests/ops/
test_paged_decode.py).
"""

from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl

TILE_MIN = 16  # the smallest key tile: tl.dot's minimum on every dimension


@triton.jit
def _tap_rows(POOL, TABLE, b, s, start, seq_len, hk, cols, mask_c, stride_tb, stride_pb, stride_ps, stride_ph,
              BS: tl.constexpr, j: tl.constexpr):
    """fp32 [BS, len(cols)] of the rows s - j (zero where s - j < start or s >= seq_len)."""
    src = s - j
    ok = (src >= start) & (s < seq_len)
    src_c = tl.where(ok, src, 0)
    blk = tl.load(TABLE + b * stride_tb + src_c // BS, mask=ok, other=0).to(tl.int64)
    off = blk * stride_pb + (src_c % BS).to(tl.int64) * stride_ps + hk.to(tl.int64) * stride_ph
    return tl.load(POOL + off[:, None] + cols[None, :], mask=ok[:, None] & mask_c[None, :], other=0.0).to(tl.float32)


@triton.jit
def _tile_step(KP, VP, TABLE, CK, CV, COS, SIN, b, hk, t, start, seq_len, q1, q2, m_i, l_i, acc, scale, HALF,
               stride_tb, stride_pb, stride_ps, stride_ph, half, mask_h, dcols, mask_d,
               BS: tl.constexpr, TILE: tl.constexpr, W: tl.constexpr, IEEE: tl.constexpr, BLOCK_HALF: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Key tile t: its shifted, rotated keys and shifted values formed in registers, then one step of the
    online softmax for the group's queries. Returns the updated (m_i, l_i, acc)."""
    s = t * TILE + tl.arange(0, TILE)
    k1 = tl.zeros([TILE, BLOCK_HALF], dtype=tl.float32)
    k2 = tl.zeros([TILE, BLOCK_HALF], dtype=tl.float32)
    v = tl.zeros([TILE, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(W):
        a = tl.load(CK + hk * W + j)
        bb = tl.load(CV + hk * W + j)
        x1 = _tap_rows(KP, TABLE, b, s, start, seq_len, hk, half, mask_h, stride_tb, stride_pb, stride_ps,
                       stride_ph, BS, j)
        x2 = _tap_rows(KP, TABLE, b, s, start, seq_len, hk, HALF + half, mask_h, stride_tb, stride_pb,
                       stride_ps, stride_ph, BS, j)
        c = tl.load(COS + j * HALF + half, mask=mask_h, other=1.0)[None, :]
        sn = tl.load(SIN + j * HALF + half, mask=mask_h, other=0.0)[None, :]
        k1 += a * (x1 * c - x2 * sn)
        k2 += a * (x2 * c + x1 * sn)
        v += bb * _tap_rows(VP, TABLE, b, s, start, seq_len, hk, dcols, mask_d, stride_tb, stride_pb,
                            stride_ps, stride_ph, BS, j)
    live = (s >= start) & (s < seq_len)
    if IEEE:
        score = tl.dot(k1, tl.trans(q1), input_precision="ieee") + tl.dot(k2, tl.trans(q2), input_precision="ieee")
    else:
        score = tl.dot(k1, tl.trans(q1), input_precision="tf32") + tl.dot(k2, tl.trans(q2), input_precision="tf32")
    score = tl.where(live[:, None], score * scale, -float("inf"))  # (TILE, BLOCK_G)
    m_new = tl.maximum(m_i, tl.max(score, axis=0))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    p = tl.where(live[:, None], tl.exp(score - m_safe[None, :]), 0.0)
    alpha = tl.where(m_i == -float("inf"), 0.0, tl.exp(m_i - m_safe))
    l_i = l_i * alpha + tl.sum(p, axis=0)
    if IEEE:
        pv = tl.dot(tl.trans(p), v, input_precision="ieee")
    else:
        pv = tl.dot(tl.trans(p), v, input_precision="tf32")
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def paged_shift_decode_kernel(Q, KP, VP, TABLE, SEQ, START, CK, CV, COS, SIN, M_OUT, L_OUT, ACC_OUT,
                              scale, Hq, D, HALF, tiles_per_split,
                              stride_qb, stride_qh, stride_tb, stride_pb, stride_ps, stride_ph,
                              BS: tl.constexpr, TILE: tl.constexpr, W: tl.constexpr, GROUP: tl.constexpr,
                              BLOCK_G: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                              NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr, FOR_LOOP: tl.constexpr):
    """One program per (sequence, KV head, key split): the shifted, rotated key tile and the shifted value tile
    are formed once and serve the GROUP query heads that share the KV head, as two small matmuls (scores
    (TILE, BLOCK_G), outputs (BLOCK_G, BLOCK_D); BLOCK_G >= 16 rows, the padding masked). The operands stay
    fp32: IEEE (an fp32 model) multiplies them exactly, otherwise as TF32 on tensor cores (a 10-bit mantissa,
    finer than the bf16 / fp16 the cache holds). FOR_LOOP (compiled kernels): the tiles run in a `for` loop
    over runtime bounds, which the compiler software-pipelines (sm_90: asynchronous copies of the next tiles;
    no speed-up measured over the `while`, docs/gpu.md); the interpreter cannot range() over a loaded value, so
    it runs the same tiles in a `while`."""
    b = tl.program_id(0)
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    seq_len = tl.load(SEQ + b)
    start = tl.load(START + b)
    half = tl.arange(0, BLOCK_HALF)
    mask_h = half < HALF
    dcols = tl.arange(0, BLOCK_D)
    mask_d = dcols < D
    g = tl.arange(0, BLOCK_G)
    mask_g = g < GROUP
    hq = hk * GROUP + g
    q_off = b * stride_qb + hq * stride_qh
    qm = mask_g[:, None] & mask_h[None, :]
    q1 = tl.load(Q + q_off[:, None] + half[None, :], mask=qm, other=0.0).to(tl.float32)  # (BLOCK_G, BLOCK_HALF)
    q2 = tl.load(Q + q_off[:, None] + HALF + half[None, :], mask=qm, other=0.0).to(tl.float32)
    m_i = tl.full([BLOCK_G], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    first = sp * tiles_per_split
    # only the split's tiles that hold live slots: none before the row's start, none from seq_len on (a static
    # cache's unwritten slots, the empty splits of a short cache)
    lo = first + tl.maximum(start // TILE - first, 0)
    hi = first + tl.minimum(tiles_per_split, (seq_len + TILE - 1) // TILE - first)
    if FOR_LOOP:
        for t in range(lo, hi):
            m_i, l_i, acc = _tile_step(KP, VP, TABLE, CK, CV, COS, SIN, b, hk, t, start, seq_len, q1, q2, m_i, l_i,
                                       acc, scale, HALF, stride_tb, stride_pb, stride_ps, stride_ph, half, mask_h,
                                       dcols, mask_d, BS, TILE, W, IEEE, BLOCK_HALF, BLOCK_D)
    else:
        t = lo
        while t < hi:
            m_i, l_i, acc = _tile_step(KP, VP, TABLE, CK, CV, COS, SIN, b, hk, t, start, seq_len, q1, q2, m_i, l_i,
                                       acc, scale, HALF, stride_tb, stride_pb, stride_ps, stride_ph, half, mask_h,
                                       dcols, mask_d, BS, TILE, W, IEEE, BLOCK_HALF, BLOCK_D)
            t += 1
    out = (b * Hq + hq) * NUM_SPLITS + sp
    tl.store(M_OUT + out, m_i, mask=mask_g)
    tl.store(L_OUT + out, l_i, mask=mask_g)
    tl.store(ACC_OUT + out[:, None] * D + dcols[None, :], acc, mask=mask_g[:, None] & mask_d[None, :])


# whether the kernel is compiled (a JITFunction) or run by Triton's interpreter (TRITON_INTERPRET=1 when the module
# was imported; the interpreter also accepts CUDA tensors, so the tensors' device cannot tell)
COMPILED = isinstance(paged_shift_decode_kernel, triton.runtime.jit.JITFunction)


def _check(q, k_pool, v_pool, block_table, seq_lens, coef_k, coef_v, cos, sin, start, num_splits):
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor")
    if q.dim() != 3:
        raise ValueError(f"q must be (B, H_q, D), got shape {tuple(q.shape)}")
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(f"k_pool and v_pool must both be (n_blocks, block_size, H_kv, D), got "
                         f"{tuple(k_pool.shape)} and {tuple(v_pool.shape)}")
    B, Hq, D = q.shape
    bs, Hkv = k_pool.shape[1], k_pool.shape[2]
    if k_pool.shape[3] != D or D % 2:
        raise ValueError(f"k_pool's head dim must equal q's and be even, got {k_pool.shape[3]} and {D}")
    if bs & (bs - 1) or bs < 1:
        raise ValueError(f"block_size must be a power of two, got {bs}")
    if Hq % Hkv:
        raise ValueError(f"q's {Hq} heads must be a multiple of the cache's {Hkv} KV heads")
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != B \
            or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table must be an int (B={B}, max_blocks) tensor, got "
                         f"{tuple(getattr(block_table, 'shape', ()))}")
    for name, t in (("seq_lens", seq_lens), ("start", start)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (B,)):
            raise ValueError(f"{name} must be an int tensor of shape ({B},), got {tuple(getattr(t, 'shape', ()))}")
    W = coef_k.shape[1] if isinstance(coef_k, torch.Tensor) and coef_k.dim() == 2 else -1
    for name, c in (("coef_k", coef_k), ("coef_v", coef_v)):
        if not isinstance(c, torch.Tensor) or tuple(c.shape) != (Hkv, W) or not 1 <= W <= 4:
            raise ValueError(f"{name} must be (H_kv={Hkv}, W) with 1 <= W <= 4 and both sides of the same W, "
                             f"got {tuple(getattr(c, 'shape', ()))}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] < W or t.shape[1] != D // 2:
            raise ValueError(f"{name} must be (W={W}, D/2={D // 2}), got {tuple(getattr(t, 'shape', ()))}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")


def paged_shift_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                       seq_lens: torch.Tensor, coef_k: torch.Tensor, coef_v: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, *, start: torch.Tensor | None = None, scale: float | None = None,
                       num_splits: int = 1, num_warps: int | None = None, num_stages: int | None = None
                       ) -> torch.Tensor:
    """Attention of one rotated query per sequence over a paged standard cache, shifted on read.

    q (B, H_q, D): RoPE'd queries. k_pool / v_pool (n_blocks, block_size, H_kv, D): rotated raw keys and raw
    values (block_size a power of two). block_table (B, max_blocks) int: physical block of each logical one.
    seq_lens (B,) int: cached slots of each sequence, the current token's included. coef_k / coef_v (H_kv, W):
    current-first coefficients (identity columns [1, 0, ...] for an unshifted side). cos / sin (W, D/2):
    R_0 .. R_{W-1} (`kvshift.layers.stateless.rotation_tables`; cos 1 / sin 0 without RoPE). start (B,) int:
    slot of each row's first real token (default 0). num_warps / num_stages: Triton launch options, for tuning
    (scripts/dev/decode_sweep.py). Returns (B, H_q, D) in q's dtype (fp32 accumulation)."""
    _check(q, k_pool, v_pool, block_table, seq_lens, coef_k, coef_v, cos, sin, start, num_splits)
    dev = q.device
    k_pool, v_pool = k_pool.contiguous(), v_pool.contiguous()
    seq = seq_lens.to(device=dev, dtype=torch.int32).contiguous()
    n_blocks = max(1, -(-int(seq.max().item()) // k_pool.shape[1])) if q.shape[0] else 1
    return _launch(q, k_pool, v_pool, block_table, seq, start, coef_k, coef_v, cos, sin, scale, num_splits,
                   bs=k_pool.shape[1], n_blocks=n_blocks, strides=(k_pool.stride(0), k_pool.stride(1),
                                                                     k_pool.stride(2)),
                   num_warps=num_warps, num_stages=num_stages)


def dense_shift_decode(q: torch.Tensor, C: torch.Tensor, V: torch.Tensor, start: torch.Tensor, seq_lens: torch.Tensor,
                       coef_k: torch.Tensor, coef_v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                       block: int = 64, num_splits: int | None = None, scale: float | None = None,
                       table: torch.Tensor | None = None, num_warps: int | None = None,
                       num_stages: int | None = None) -> torch.Tensor:
    """The same kernel over a dense standard cache, transformers' layout: C, V (B, H_kv, S, D), rotated raw keys
    and raw values, last dim contiguous and the same strides for both (a view of a larger allocation is
    fine). No copy: a block table of `block`-slot tiles is made up whose entries address the tensor itself
    (row b, tile i -> slot row b * stride(0) / stride(2) + i * block, in units of stride(2)). Row b's real
    tokens are slots start[b] .. seq_lens[b] - 1 (left padding before them, unwritten slots after), the new
    token's included; nothing outside that span is read as a key or a tap. num_splits: key splits per
    (row, KV head), by default enough programs for about two waves on 132 SMs. table: `dense_table(C, block)`, to
    reuse one across the layers of a step. num_warps / num_stages: as in `paged_shift_decode`. No host
    synchronisation."""
    if not dense_layout_ok(C, V):
        raise ValueError(f"C and V must be (B, H_kv, S, D) with the same strides, the last one 1, got "
                         f"{tuple(C.shape)} {C.stride()} and {tuple(V.shape)} {V.stride()}")
    B, Hkv, S, D = C.shape
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    n_blocks = max(1, -(-S // block))
    if num_splits is None:  # not bounded by the cache's length: the same compiled kernel while the cache grows;
        # one off CUDA (the interpreter runs every program in Python)
        num_splits = max(1, -(-264 // max(1, B * Hkv))) if q.is_cuda else 1
    table = dense_table(C, block) if table is None else table
    shape = torch.empty((1, block, Hkv, D), device="meta", dtype=C.dtype)  # the shapes _check knows (no memory)
    _check(q, shape, shape, table, seq_lens, coef_k, coef_v, cos, sin, start, num_splits)
    seq = seq_lens.to(device=q.device, dtype=torch.int32).contiguous()
    row = C.stride(2)
    return _launch(q, C, V, table, seq, start, coef_k, coef_v, cos, sin, scale, num_splits, bs=block,
                   n_blocks=n_blocks, strides=(row, row, C.stride(1)), num_warps=num_warps, num_stages=num_stages)


def dense_layout_ok(C: torch.Tensor, V: torch.Tensor) -> bool:
    """Whether `dense_shift_decode` can address C and V in place (and its int32 block table reaches them)."""
    if C.dim() != 4 or C.shape != V.shape or C.stride() != V.stride() or C.stride(3) != 1 or C.shape[3] % 2:
        return False
    B, row = C.shape[0], C.stride(2)
    if B > 1 and C.stride(0) % row:
        return False
    return (B - 1) * (C.stride(0) // row) + C.shape[2] < 2 ** 31


def dense_table(C: torch.Tensor, block: int) -> torch.Tensor:
    """The made-up block table of a dense cache: row b, tile i -> slot row b * stride(0) / stride(2) + i * block
    (the kernel multiplies it by stride(2)), int32 (B, ceil(S / block))."""
    B, S, row = C.shape[0], C.shape[2], C.stride(2)
    n_blocks = max(1, -(-S // block))
    per_row = C.stride(0) // row if B > 1 else 0
    return (torch.arange(B, device=C.device, dtype=torch.int32).view(B, 1) * per_row
            + torch.arange(n_blocks, device=C.device, dtype=torch.int32).view(1, n_blocks) * block)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


# Software-pipelining stages of the tile loop. 2: the fastest in an H200 sweep (scripts/dev/decode_sweep.py:
# tiles of 32/64/128 slots, 4/8 warps, 2/4 stages and Triton's default, 16x2048 and 128x8192 caches of 64-wide
# heads, every configuration checked against the PyTorch read first), 6-8% faster than Triton's default of 3 at
# the default tile and warps, and the least shared memory of those tried.
DEFAULT_STAGES = 2


def launch_constants(bs: int, group: int, D: int, W: int, num_splits: int, dtype: torch.dtype, *,
                     compiled: bool = True) -> dict:
    """The kernel's compile-time constants for a launch (the sm_90 compile test compiles with these). tl.dot
    needs 16 or more on every dimension: the key tile, the padded group and both head-dim blocks. compiled:
    False under Triton's interpreter (the tile loop as a `while`)."""
    return dict(BS=bs, TILE=max(TILE_MIN, bs),  # a tile may span several blocks: each row finds its own
                W=W, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
                BLOCK_HALF=max(16, triton.next_power_of_2(D // 2)), BLOCK_D=max(16, triton.next_power_of_2(D)),
                NUM_SPLITS=num_splits, IEEE=dtype == torch.float32, FOR_LOOP=compiled)


def _launch(q, KP, VP, block_table, seq, start, coef_k, coef_v, cos, sin, scale, num_splits, *, bs, n_blocks,
            strides, num_warps=None, num_stages=None):
    """The kernel and the merge of its key splits; strides: (block, slot, head) of the pools, in elements.
    num_warps / num_stages: Triton's launch options (None: 8 warps for 128-wide heads, else 4; DEFAULT_STAGES)."""
    if num_warps is not None and not (_is_int(num_warps) and int(num_warps) in (1, 2, 4, 8, 16)):
        raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {num_warps!r}")
    if num_stages is not None and not (_is_int(num_stages) and num_stages >= 1):
        raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
    num_warps = None if num_warps is None else int(num_warps)
    num_stages = None if num_stages is None else int(num_stages)
    B, Hq, D = q.shape
    Hkv = coef_k.shape[0]
    W = coef_k.shape[1]
    dev = q.device
    q = q.contiguous()
    table = block_table.to(device=dev, dtype=torch.int32).contiguous()
    st = torch.zeros(B, dtype=torch.int32, device=dev) if start is None else start.to(device=dev, dtype=torch.int32)
    f32 = dict(device=dev, dtype=torch.float32)
    ck, cv = coef_k.to(**f32).contiguous(), coef_v.to(**f32).contiguous()
    cs, sn = cos[:W].to(**f32).contiguous(), sin[:W].to(**f32).contiguous()
    const = launch_constants(bs, Hq // Hkv, D, W, num_splits, q.dtype, compiled=COMPILED)
    tile = const["TILE"]
    n_tiles = -(-(n_blocks * bs) // tile)
    per_split = -(-n_tiles // num_splits)
    m = torch.empty(B, Hq, num_splits, **f32)
    lse = torch.empty(B, Hq, num_splits, **f32)
    acc = torch.empty(B, Hq, num_splits, D, **f32)
    grid = (B, Hkv, num_splits)
    paged_shift_decode_kernel[grid](
        q, KP, VP, table, seq, st, ck, cv, cs, sn, m, lse, acc,
        scale if scale is not None else 1.0 / math.sqrt(D), Hq, D, D // 2, per_split,
        q.stride(0), q.stride(1), table.stride(0), strides[0], strides[1], strides[2],
        num_warps=num_warps or (8 if const["BLOCK_D"] >= 128 else 4),
        num_stages=DEFAULT_STAGES if num_stages is None else num_stages, **const)
    if num_splits == 1:
        return (acc[:, :, 0] / lse.clamp_min(1e-30)).to(q.dtype)
    # merge the splits: log-sum-exp over the partial maxima (an empty split has m = -inf, l = 0)
    m_all = m.amax(dim=2, keepdim=True)
    m_all = torch.where(torch.isinf(m_all), torch.zeros_like(m_all), m_all)
    w = torch.where(torch.isinf(m), torch.zeros_like(m), torch.exp(m - m_all))
    out = (acc * w.unsqueeze(-1)).sum(2) / (lse * w).sum(2, keepdim=True).clamp_min(1e-30)
    return out.to(q.dtype)
