"""The naive KV-shift op against an explicit per-token loop (float64), gradcheck, and input checks."""

import pytest
import torch

from kvshift import kv_shift


def loop_reference(x, w, cu=None, prev=None):
    """Explicit per-token definition: out[t] = sum_j w[:, j] x[t-j], zero (or prev) before a start."""
    if cu is None:
        B, T = x.shape[:2]
        docs = [(b, 0, T) for b in range(B)]
        get = lambda b, t: x[b, t]
        out = torch.zeros_like(x)
        put = lambda b, t, val: out[b].__setitem__(t, val)
    else:
        c = cu.tolist()
        docs = [(i, c[i], c[i + 1]) for i in range(len(c) - 1)]
        get = lambda b, t: x[t]
        out = torch.zeros_like(x)
        put = lambda b, t, val: out.__setitem__(t, val)
    W = w.shape[1]
    for b, s, e in docs:
        for t in range(s, e):
            acc = torch.zeros_like(x[0] if cu is not None else x[0, 0])
            for j in range(W):
                src = t - j
                if src >= s:
                    acc = acc + w[:, j, None] * get(b, src)
                elif prev is not None and s - src <= W - 1:
                    acc = acc + w[:, j, None] * prev[b, W - 1 - (s - src)]
            put(b, t, acc)
    return out


CASES = [  # (B, T, H, D, W)
    (1, 1, 1, 1, 2),
    (2, 7, 3, 5, 2),
    (3, 63, 2, 24, 3),
    (2, 13, 4, 6, 4),
    (1, 5, 2, 3, 1),
]


@pytest.mark.parametrize("B,T,H,D,W", CASES, ids=[f"B{c[0]}T{c[1]}H{c[2]}D{c[3]}W{c[4]}" for c in CASES])
@pytest.mark.parametrize("with_prev", [False, True], ids=["noprev", "prev"])
def test_padded_matches_loop(B, T, H, D, W, with_prev):
    g = torch.Generator().manual_seed(B * 1000 + T)
    x = torch.randn(B, T, H, D, dtype=torch.float64, generator=g)
    w = torch.randn(H, W, dtype=torch.float64, generator=g)
    prev = torch.randn(B, W - 1, H, D, dtype=torch.float64, generator=g) if with_prev else None
    torch.testing.assert_close(kv_shift(x, w, prev=prev), loop_reference(x, w, prev=prev), rtol=0, atol=1e-12)


@pytest.mark.parametrize("lengths", [[5, 1, 9, 3], [7], [0, 4, 0, 2], [1, 1, 1]], ids=["mixed", "one", "empty", "ones"])
@pytest.mark.parametrize("W", [2, 3, 4], ids=["W2", "W3", "W4"])
@pytest.mark.parametrize("with_prev", [False, True], ids=["noprev", "prev"])
def test_varlen_matches_loop(lengths, W, with_prev):
    g = torch.Generator().manual_seed(sum(lengths) + W)
    H, D = 3, 5
    N = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    x = torch.randn(N, H, D, dtype=torch.float64, generator=g)
    w = torch.randn(H, W, dtype=torch.float64, generator=g)
    prev = torch.randn(len(lengths), W - 1, H, D, dtype=torch.float64, generator=g) if with_prev else None
    torch.testing.assert_close(kv_shift(x, w, cu_seqlens=cu, prev=prev), loop_reference(x, w, cu, prev),
                               rtol=0, atol=1e-12)


def test_varlen_equals_padded_rows():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 11, 2, 7, dtype=torch.float64, generator=g)
    w = torch.randn(2, 3, dtype=torch.float64, generator=g)
    cu = torch.arange(4, dtype=torch.int32) * 11
    torch.testing.assert_close(kv_shift(x.reshape(33, 2, 7), w, cu_seqlens=cu).view(3, 11, 2, 7), kv_shift(x, w))


def test_gradcheck_padded_and_varlen():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    prev = torch.randn(2, 2, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: kv_shift(a, b, prev=c), (x, w, prev))
    xp = torch.randn(7, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda a, b, c: kv_shift(a, b, cu_seqlens=cu, prev=c), (xp, w, prev))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)],
                         ids=["fp32", "bf16", "fp16"])
def test_low_precision_close_to_fp64(dtype, tol):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 3, 10, dtype=torch.float64, generator=g)
    w = torch.randn(3, 2, dtype=torch.float64, generator=g)
    ref = kv_shift(x, w)
    out = kv_shift(x.to(dtype), w.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * 4)


def test_identity_weight_is_identity():
    x = torch.randn(2, 6, 3, 4)
    w = torch.zeros(3, 3)
    w[:, 0] = 1
    assert torch.equal(kv_shift(x, w), x)


def test_deterministic_backward():
    x = torch.randn(2, 33, 3, 8, requires_grad=True)
    w = torch.randn(3, 2, requires_grad=True)
    grads = []
    for _ in range(2):
        gx, gw = torch.autograd.grad(kv_shift(x, w).pow(2).sum(), (x, w))
        grads.append((gx, gw))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


BAD = {
    "x_rank": (lambda: (torch.randn(2, 3, 4), torch.randn(3, 2), {}), "x must be"),
    "x_int": (lambda: (torch.ones(2, 3, 4, 5, dtype=torch.long), torch.randn(4, 2), {}), "x must be a floating"),
    "weight_heads": (lambda: (torch.randn(2, 3, 4, 5), torch.randn(3, 2), {}), "weight has 3 heads"),
    "weight_rank": (lambda: (torch.randn(2, 3, 4, 5), torch.randn(4), {}), "weight must have shape"),
    "weight_taps": (lambda: (torch.randn(2, 3, 4, 5), torch.randn(4, 5), {}), "weight must have shape"),
    "prev_shape": (lambda: (torch.randn(2, 3, 4, 5), torch.randn(4, 2), {"prev": torch.randn(2, 2, 4, 5)}), "prev must"),
    "cu_start": (lambda: (torch.randn(6, 4, 5), torch.randn(4, 2), {"cu_seqlens": torch.tensor([1, 6], dtype=torch.int32)}), "start at 0"),
    "cu_decreasing": (lambda: (torch.randn(6, 4, 5), torch.randn(4, 2), {"cu_seqlens": torch.tensor([0, 4, 2, 6], dtype=torch.int32)}), "non-decreasing"),
    "cu_total": (lambda: (torch.randn(6, 4, 5), torch.randn(4, 2), {"cu_seqlens": torch.tensor([0, 5], dtype=torch.int32)}), "end at"),
    "cu_dtype": (lambda: (torch.randn(6, 4, 5), torch.randn(4, 2), {"cu_seqlens": torch.tensor([0, 6])}), "int32"),
    "packed_without_cu": (lambda: (torch.randn(6, 4, 5), torch.randn(4, 2), {}), "x must be"),
    "impl": (lambda: (torch.randn(2, 3, 4, 5), torch.randn(4, 2), {"impl": "cuda"}), "impl must be"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_names_the_argument(case):
    make, msg = BAD[case]
    x, w, kw = make()
    with pytest.raises(ValueError, match=msg):
        kv_shift(x, w, **kw)


def test_device_mismatch():
    with pytest.raises(ValueError, match="weight is on meta"):
        kv_shift(torch.randn(1, 2, 3, 4), torch.randn(3, 2, device="meta"))
    with pytest.raises(ValueError, match="prev is on meta"):
        kv_shift(torch.randn(1, 2, 3, 4), torch.randn(3, 2), prev=torch.randn(1, 1, 3, 4, device="meta"))


@pytest.mark.parametrize("W", [1, 2, 3, 4])
@pytest.mark.parametrize("with_prev", [False, True])
def test_shift_step_is_the_one_token_shift_unrounded(W, with_prev):
    """The compiled decode step's form: equal to the per-token definition (float64), and for bf16 inputs equal
    to the fp32 computation of the same taps (one rounding later, at the cache write)."""
    from kvshift.ops.shift import naive
    g = torch.Generator().manual_seed(W)
    x = torch.randn(3, 1, 5, 6, generator=g, dtype=torch.float64)
    w = torch.randn(5, W, generator=g, dtype=torch.float64)
    prev = torch.randn(3, W - 1, 5, 6, generator=g, dtype=torch.float64) if with_prev else None
    torch.testing.assert_close(naive.shift_step(x, w, prev), loop_reference(x, w, prev=prev))
    xb, wb = x.bfloat16(), w.bfloat16()
    pb = prev.bfloat16() if with_prev else None
    out = naive.shift_step(xb, wb, pb)
    assert out.dtype == torch.float32
    want = loop_reference(xb.float(), wb.float(), prev=None if pb is None else pb.float())
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="one token per row"):
        naive.shift_step(torch.zeros(3, 2, 5, 6), w, prev)
