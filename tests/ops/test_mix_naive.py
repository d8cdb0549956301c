"""The naive causal-mix op against an explicit per-token loop (float64), gradcheck, kv_shift
equivalence, and input checks."""

import itertools

import pytest
import torch

from kvshift.ops.mix import causal_mix
from kvshift.ops.shift import kv_shift

F64 = torch.float64


def loop_reference(x, w, cu=None, prev=None, residual=False, mask=None):
    """Per-token definition: y[t] = sum_j w[..., j] x[t-j] (zero or prev before a document start),
    plus x if residual; channels outside mask are x."""
    H, D = x.shape[-2:]
    W = w.shape[-1] - 1
    wf = w if w.dim() == 3 else w[:, None, :].expand(H, D, W + 1)  # (H, D, W+1)
    m = torch.ones(H, D, dtype=torch.bool) if mask is None else mask.expand(H, D)
    if cu is None:
        B, T = x.shape[:2]
        rows = [[(b, t) for t in range(T)] for b in range(B)]  # one list of indices per sequence
    else:
        c = cu.tolist()
        rows = [[(t,) for t in range(c[i], c[i + 1])] for i in range(len(c) - 1)]
    out = torch.zeros_like(x)
    for b, doc in enumerate(rows):
        for i, idx in enumerate(doc):
            acc = torch.zeros(H, D, dtype=x.dtype)
            for j in range(W + 1):
                if i - j >= 0:
                    acc = acc + wf[..., j] * x[doc[i - j]]
                elif prev is not None:
                    acc = acc + wf[..., j] * prev[b, W + (i - j)]  # i - j = -1 is prev's last slot
            if residual:
                acc = acc + x[idx]
            out[idx] = torch.where(m, acc, x[idx])
    return out


def _make(g, *, per_channel, W, H=2, D=3, cu=None, B=2, T=5, prev=False, mask=None, dtype=F64):
    if cu is None:
        x = torch.randn(B, T, H, D, dtype=dtype, generator=g)
    else:
        B = len(cu) - 1
        x = torch.randn(cu[-1], H, D, dtype=dtype, generator=g)
    w = torch.randn(*((H, D) if per_channel else (H,)), W + 1, dtype=dtype, generator=g)
    p = torch.randn(B, W, H, D, dtype=dtype, generator=g) if prev else None
    m = None
    if mask == "hd":
        m = torch.rand(H, D, generator=g) < 0.5
    elif mask == "d":
        m = torch.arange(D) < D // 2 + 1
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    return x, w, cu_t, p, m


CU = (0, 4, 4, 5, 11)  # an empty and a length-1 document among them
COMBOS = list(itertools.product([False, True], [1, 2, 3], [False, True], [None, "hd", "d"], [None, CU],
                                [False, True]))


def _id(c):
    pc, W, res, mask, cu, prev = c
    return (f"{'chan' if pc else 'head'}-W{W}-{'res' if res else 'nores'}-mask{mask}-"
            f"{'packed' if cu else 'padded'}-{'prev' if prev else 'noprev'}")


def _grads(y, leaves, seed):
    dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(y, leaves, dy, allow_unused=True)


@pytest.mark.parametrize("combo", COMBOS, ids=[_id(c) for c in COMBOS])
def test_matches_loop_outputs_and_grads(combo):
    per_channel, W, residual, mask, cu, prev = combo
    g = torch.Generator().manual_seed(W * 100 + len(_id(combo)))
    x, w, cu_t, p, m = _make(g, per_channel=per_channel, W=W, cu=cu, prev=prev, mask=mask)
    leaves = [t.requires_grad_(True) for t in (x, w, p) if t is not None]
    got = causal_mix(x, w, cu_seqlens=cu_t, prev=p, residual=residual, channel_mask=m, impl="naive")
    ref = loop_reference(x, w, cu_t, p, residual, m)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    for name, a, b in zip(("dx", "dweight", "dprev"), _grads(got, leaves, 7), _grads(ref, leaves, 7)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("per_channel", [False, True], ids=["head", "chan"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gradcheck(per_channel, packed):
    g = torch.Generator().manual_seed(5)
    x, w, cu_t, p, m = _make(g, per_channel=per_channel, W=2, D=3, T=4, cu=(0, 1, 4) if packed else None,
                             prev=True, mask="hd")
    for residual, mask in ((False, None), (True, None), (False, m), (True, m)):
        def fn(a, b, c, residual=residual, mask=mask):
            return causal_mix(a, b, cu_seqlens=cu_t, prev=c, residual=residual, channel_mask=mask, impl="naive")

        args = tuple(t.detach().clone().requires_grad_(True) for t in (x, w, p))
        assert torch.autograd.gradcheck(fn, args)


def test_weight_grad_counts_masked_channels_only():
    g = torch.Generator().manual_seed(6)
    x, w, _, _, _ = _make(g, per_channel=False, W=1, D=4)
    m = torch.tensor([True, True, False, False])
    w.requires_grad_(True)
    (dw,) = torch.autograd.grad(causal_mix(x, w, channel_mask=m, residual=True).sum(), (w,))
    want = torch.stack([x[..., :2].sum((0, 1, 3)), torch.nn.functional.pad(x, (0, 0, 0, 0, 1, 0))[:, :-1, :, :2]
                        .sum((0, 1, 3))], -1)
    torch.testing.assert_close(dw, want)


@pytest.mark.parametrize("W", [1, 2, 3], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_per_head_equals_kv_shift_exactly(W, dtype, packed):
    g = torch.Generator().manual_seed(W)
    x, w, cu_t, p, _ = _make(g, per_channel=False, W=W, H=3, D=5, T=9, cu=CU if packed else None, prev=True,
                             dtype=dtype)
    for prev in (None, p):
        a = causal_mix(x, w, cu_seqlens=cu_t, prev=prev, impl="naive")
        b = kv_shift(x, w, cu_seqlens=cu_t, prev=prev, impl="naive")
        assert a.dtype == dtype and torch.equal(a, b)


def test_partial_key_offset_takes_previous_value():
    x = torch.randn(2, 6, 3, 4)
    w = torch.tensor([[0.0, 1.0]]).expand(3, 2)
    m = torch.tensor([False, False, True, True])
    y = causal_mix(x, w, channel_mask=m)
    assert torch.equal(y[..., :2], x[..., :2])
    assert torch.equal(y[:, 1:, :, 2:], x[:, :-1, :, 2:]) and torch.equal(y[:, 0, :, 2:], torch.zeros(2, 3, 2))


def test_streaming_with_prev_equals_full_sequence():
    g = torch.Generator().manual_seed(8)
    x, w, _, _, m = _make(g, per_channel=True, W=3, T=10, mask="hd")
    full = causal_mix(x, w, residual=True, channel_mask=m)
    head = causal_mix(x[:, :6], w, residual=True, channel_mask=m)
    tail = causal_mix(x[:, 6:], w, prev=x[:, 3:6], residual=True, channel_mask=m)
    torch.testing.assert_close(torch.cat([head, tail], 1), full, rtol=0, atol=1e-12)


def _bad(**kw):
    base = dict(x=torch.randn(2, 3, 4, 5), weight=torch.randn(4, 2))
    base.update(kw)
    x, w = base.pop("x"), base.pop("weight")
    return lambda: causal_mix(x, w, **base)


BAD = {
    "x_rank": (_bad(x=torch.randn(2, 3, 4)), "x must be"),
    "x_int": (_bad(x=torch.ones(2, 3, 4, 5, dtype=torch.long)), "x must be a floating"),
    "weight_int": (_bad(weight=torch.ones(4, 2, dtype=torch.long)), "weight must be"),
    "weight_heads": (_bad(weight=torch.randn(3, 2)), "weight must have shape"),
    "weight_chans": (_bad(weight=torch.randn(4, 6, 2)), "weight must have shape"),
    "weight_rank": (_bad(weight=torch.randn(4)), "weight must have shape"),
    "weight_W0": (_bad(weight=torch.randn(4, 1)), "weight must have W\\+1 columns"),
    "weight_W4": (_bad(weight=torch.randn(4, 5, 5)), "weight must have W\\+1 columns"),
    "prev_shape": (_bad(prev=torch.randn(2, 2, 4, 5)), "prev must have shape"),
    "prev_int": (_bad(prev=torch.ones(2, 1, 4, 5, dtype=torch.long)), "prev must be"),
    "mask_shape": (_bad(channel_mask=torch.ones(4, dtype=torch.bool)), "channel_mask must have shape"),
    "mask_dtype": (_bad(channel_mask=torch.ones(4, 5)), "channel_mask must be"),
    "residual": (_bad(residual=1), "residual must be a bool"),
    "cu_start": (_bad(x=torch.randn(6, 4, 5), cu_seqlens=torch.tensor([1, 6], dtype=torch.int32)), "start at 0"),
    "cu_decreasing": (_bad(x=torch.randn(6, 4, 5), cu_seqlens=torch.tensor([0, 4, 2, 6], dtype=torch.int32)),
                      "non-decreasing"),
    "cu_total": (_bad(x=torch.randn(6, 4, 5), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), "end at"),
    "cu_dtype": (_bad(x=torch.randn(6, 4, 5), cu_seqlens=torch.tensor([0, 6])), "cu_seqlens must be int32"),
    "cu_packed_4d": (_bad(cu_seqlens=torch.tensor([0, 6], dtype=torch.int32)), "x must be packed"),
    "packed_without_cu": (_bad(x=torch.randn(6, 4, 5)), "x must be"),
    "impl": (_bad(impl="cuda"), "impl must be"),
    "device": (_bad(weight=torch.randn(4, 2, device="meta")), "weight is on meta"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_names_the_argument(case):
    call, msg = BAD[case]
    with pytest.raises(ValueError, match=msg):
        call()
