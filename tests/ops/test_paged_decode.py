"""The Triton flash-decoding kernel over a paged standard cache (shift applied on read) against the
reference read (`kvshift.layers.stateless.read_shifted`) over the gathered blocks plus plain attention.
Without CUDA it runs under the Triton interpreter on CPU: tiny shapes."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated

import pytest  # noqa: E402

pytest.importorskip("triton")

from kvshift.layers.stateless import read_shifted, rotation_tables  # noqa: E402
from kvshift.ops.shift.paged_decode import paged_shift_decode  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BS = 8


def reference(q, k_pool, v_pool, table, seq_lens, ck, cv, cos, sin, start):
    """Gather each sequence's blocks, shift on read, attend with the query over its live slots."""
    outs = []
    for b in range(q.shape[0]):
        S = int(seq_lens[b])
        blocks = table[b, : -(-S // BS)].long()
        C = k_pool[blocks].flatten(0, 1)[:S].permute(1, 0, 2)[None].double()  # (1, Hkv, S, D)
        V = v_pool[blocks].flatten(0, 1)[:S].permute(1, 0, 2)[None].double()
        pos = (torch.arange(S) - int(start[b])).view(1, S)
        pos = torch.where(pos < 0, torch.full_like(pos, -1), pos)
        K, Vh = read_shifted(C, V, ck.double(), cv.double(), pos, cos.double(), sin.double())
        rep = q.shape[1] // K.shape[1]
        K, Vh = K[0].repeat_interleave(rep, 0), Vh[0].repeat_interleave(rep, 0)  # (Hq, S, D)
        sc = torch.einsum("hd,hsd->hs", q[b].double(), K) / q.shape[-1] ** 0.5
        sc = sc.masked_fill((pos[0] < 0).view(1, S), float("-inf"))
        outs.append(torch.einsum("hs,hsd->hd", sc.softmax(-1), Vh))
    return torch.stack(outs)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_paged_decode_equals_reference(W, num_splits):
    g = torch.Generator().manual_seed(W * 10 + num_splits)
    B, Hq, Hkv, D, n_blocks = 3, 4, 2, 8, 12
    seq_lens = torch.tensor([19, 5, 26])
    start = torch.tensor([0, 2, 9])  # rows 1 and 2 left-padded: their first real token sees zeros
    k_pool = torch.randn(n_blocks, BS, Hkv, D, generator=g)
    v_pool = torch.randn(n_blocks, BS, Hkv, D, generator=g)
    table = torch.randperm(n_blocks, generator=g)[:B * 4].view(B, 4).to(torch.int32)  # shuffled physical blocks
    table[1, 0] = table[0, 0]  # a shared block is fine: the cache holds raw rows
    q = torch.randn(B, Hq, D, generator=g)
    ck = torch.randn(Hkv, W, generator=g)
    cv = torch.randn(Hkv, W, generator=g)
    cos, sin = rotation_tables(W - 1, D, 10_000.0, dtype=torch.float32)
    want = reference(q, k_pool, v_pool, table, seq_lens, ck, cv, cos, sin, start)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    got = paged_shift_decode(dev(q), dev(k_pool), dev(v_pool), dev(table), dev(seq_lens), dev(ck), dev(cv),
                             dev(cos), dev(sin), start=dev(start), num_splits=num_splits)
    assert (got.cpu().double() - want).abs().max().item() <= 1e-5
    if W == 2:  # Triton's launch options (for tuning) leave the result as it is
        tuned = paged_shift_decode(dev(q), dev(k_pool), dev(v_pool), dev(table), dev(seq_lens), dev(ck), dev(cv),
                                   dev(cos), dev(sin), start=dev(start), num_splits=num_splits, num_warps=2,
                                   num_stages=2)
        assert (tuned - got).abs().max().item() <= 1e-6  # the interpreter ignores them: this checks the GPU


def test_bad_input_names_the_argument():
    q = torch.zeros(1, 2, 8)
    pool = torch.zeros(2, BS, 2, 8)
    table = torch.zeros(1, 2, dtype=torch.int32)
    seq = torch.tensor([3])
    c = torch.ones(2, 2)
    cos, sin = rotation_tables(1, 8, 10_000.0, dtype=torch.float32)
    with pytest.raises(ValueError, match="q must"):
        paged_shift_decode(q[0], pool, pool, table, seq, c, c, cos, sin)
    with pytest.raises(ValueError, match="block_table"):
        paged_shift_decode(q, pool, pool, table[0], seq, c, c, cos, sin)
    with pytest.raises(ValueError, match="coef_v"):
        paged_shift_decode(q, pool, pool, table, seq, c, torch.ones(2, 3), cos, sin)
    with pytest.raises(ValueError, match="cos"):
        paged_shift_decode(q, pool, pool, table, seq, c, c, cos[:, :2], sin)
    with pytest.raises(ValueError, match="num_splits"):
        paged_shift_decode(q, pool, pool, table, seq, c, c, cos, sin, num_splits=0)
    with pytest.raises(ValueError, match="num_warps"):
        paged_shift_decode(q, pool, pool, table, seq, c, c, cos, sin, num_warps=3)
    with pytest.raises(ValueError, match="num_warps"):
        paged_shift_decode(q, pool, pool, table, seq, c, c, cos, sin, num_warps=4.0)
    with pytest.raises(ValueError, match="num_stages"):
        paged_shift_decode(q, pool, pool, table, seq, c, c, cos, sin, num_stages=0)


@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("W", [1, 2, 4])
def test_dense_decode_reads_transformers_layout_in_place(W, num_splits):
    """`dense_shift_decode`: the same kernel over a (B, H_kv, S, D) cache, a view of a larger allocation (a
    RawKVCache's slots so far), rows left-padded and with unwritten slots after their end; equals the
    reference read of each row's live slots."""
    from kvshift.ops.shift.paged_decode import dense_shift_decode

    g = torch.Generator().manual_seed(W * 7 + (num_splits or 0))
    B, Hq, Hkv, D, S_alloc, S = 3, 4, 2, 8, 40, 29
    start = torch.tensor([0, 3, 11])
    seq_lens = torch.tensor([29, 29, 20])  # row 2 has 9 unwritten slots at the end (a static cache)
    Ka = torch.randn(B, Hkv, S_alloc, D, generator=g)
    Va = torch.randn(B, Hkv, S_alloc, D, generator=g)
    C, V = Ka[:, :, :S], Va[:, :, :S]
    q = torch.randn(B, Hq, D, generator=g)
    ck, cv = torch.randn(Hkv, W, generator=g), torch.randn(Hkv, W, generator=g)
    cos, sin = rotation_tables(W - 1, D, 10_000.0, dtype=torch.float32)
    # the reference over a paged copy: blocks of BS slots in order
    nb = -(-S // BS)
    pad = torch.zeros(B, Hkv, nb * BS - S, D)
    pool_k = torch.cat([C, pad], 2).permute(0, 2, 1, 3).reshape(B * nb, BS, Hkv, D)
    pool_v = torch.cat([V, pad], 2).permute(0, 2, 1, 3).reshape(B * nb, BS, Hkv, D)
    table = torch.arange(B * nb).view(B, nb)
    want = reference(q, pool_k, pool_v, table, seq_lens, ck, cv, cos, sin, start)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    Ka_d, Va_d = dev(Ka), dev(Va)
    for block in (8, 16):
        got = dense_shift_decode(dev(q), Ka_d[:, :, :S], Va_d[:, :, :S], dev(start), dev(seq_lens), dev(ck),
                                 dev(cv), dev(cos), dev(sin), block=block, num_splits=num_splits)
        assert (got.cpu().double() - want).abs().max().item() <= 1e-5, block
    with pytest.raises(ValueError, match="same strides"):
        dense_shift_decode(dev(q), Ka_d[:, :, :S], dev(V.contiguous()), dev(start), dev(seq_lens), dev(ck), dev(cv),
                           dev(cos), dev(sin))
    with pytest.raises(ValueError, match="block"):
        dense_shift_decode(dev(q), Ka_d[:, :, :S], Va_d[:, :, :S], dev(start), dev(seq_lens), dev(ck), dev(cv),
                           dev(cos), dev(sin), block=12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_one_program_serves_every_query_head_of_a_kv_head(group, dtype):
    """Grouped-query attention: 1, 3 (a group padded inside the program) and 8 query heads per KV head, a tile
    of 16 slots spanning two 8-slot blocks, a row starting after two whole tiles (tiles before its start are
    skipped per split); fp32 and bf16 inputs (the interpreter multiplies exactly; on a GPU bf16 runs TF32)."""
    g = torch.Generator().manual_seed(group)
    B, Hkv, D, n_blocks, W = 3, 2, 8, 20, 2
    Hq = Hkv * group
    seq_lens, start = torch.tensor([37, 11, 45]), torch.tensor([0, 4, 35])
    k_pool = torch.randn(n_blocks, BS, Hkv, D, generator=g)
    v_pool = torch.randn(n_blocks, BS, Hkv, D, generator=g)
    table = torch.randperm(n_blocks, generator=g)[:B * 6].view(B, 6).to(torch.int32)
    table[2, :4] = table[0, :4]  # row 2's first 32 slots are pads: sharing row 0's blocks changes nothing
    q = torch.randn(B, Hq, D, generator=g)
    ck, cv = torch.randn(Hkv, W, generator=g), torch.randn(Hkv, W, generator=g)
    cos, sin = rotation_tables(W - 1, D, 10_000.0, dtype=torch.float32)
    r = lambda t: t.to(dtype).double()  # noqa: E731 - the reference sees the rounded inputs
    want = reference(r(q), r(k_pool), r(v_pool), table, seq_lens, ck, cv, cos, sin, start)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    got = paged_shift_decode(dev(q.to(dtype)), dev(k_pool.to(dtype)), dev(v_pool.to(dtype)), dev(table),
                             dev(seq_lens), dev(ck), dev(cv), dev(cos), dev(sin), start=dev(start), num_splits=3)
    assert got.dtype == dtype and got.shape == (B, Hq, D)
    tol = 1e-5 if dtype == torch.float32 else 1e-2 * want.abs().max().item()  # bf16 output rounding
    assert (got.cpu().double() - want).abs().max().item() <= tol


def test_launch_options_default_to_the_tuned_ones(monkeypatch):
    """Without num_warps / num_stages the launcher passes its tuned defaults (4 warps below 128-wide heads,
    DEFAULT_STAGES = 2 stages); given ones reach the kernel as they are."""
    from kvshift.ops.shift import paged_decode as pd

    seen = []

    class Recorder:  # stands in for the kernel: records the launch options, then stops the launch
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append({k: kwargs[k] for k in ("num_warps", "num_stages")})
                raise RuntimeError("recorded")
            return launch

    monkeypatch.setattr(pd, "paged_shift_decode_kernel", Recorder())
    q = torch.zeros(1, 2, 8)
    pool = torch.zeros(2, BS, 2, 8)
    table = torch.zeros(1, 2, dtype=torch.int32)
    c = torch.ones(2, 2)
    cos, sin = rotation_tables(1, 8, 10_000.0, dtype=torch.float32)
    for kwargs in ({}, {"num_warps": 8, "num_stages": 4}):
        with pytest.raises(RuntimeError, match="recorded"):
            pd.paged_shift_decode(q, pool, pool, table, torch.tensor([3]), c, c, cos, sin, **kwargs)
    assert pd.DEFAULT_STAGES == 2
    assert seen == [{"num_warps": 4, "num_stages": 2}, {"num_warps": 8, "num_stages": 4}]
