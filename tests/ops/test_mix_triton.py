"""Fused Triton causal mix (fwd/bwd/dprev) against the naive specification.

Without CUDA the kernels run under the Triton interpreter on CPU, so shapes stay tiny. Every case
compares the output and every gradient (x, weight, prev). Low-precision cases compare against the
naive op evaluated in fp32 on the same (rounded) inputs: the kernel accumulates in fp32 and rounds
once, so the fp32 reference is the exact target up to that one rounding.
"""

import os

import torch

if not torch.cuda.is_available():
    # must be set before the kernels are decorated (first import of kvshift.ops.mix.triton)
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from kvshift.ops import mix as mix_api  # noqa: E402
from kvshift.ops.mix import naive  # noqa: E402
from kvshift.ops.mix import triton as tm  # noqa: E402
from kvshift.ops.shift import triton as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# max |kernel - reference| <= TOL * max(1, max |reference|), per tensor (the shift kernels' bounds):
# fp32 differs from the reference only in summation order; bf16/fp16 outputs and grads are rounded
# once from fp32 (relative step 2^-8 / 2^-11), well inside 1e-2.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

CU_SMALL = (0, 3, 3, 4, 11)  # an empty and a length-1 document among them
CU_LONG = (0, 1, 40, 40, 63)
_MANY = (0, 2, 0, 0, 1, 5, 0, 3, 1, 1, 0, 7, 2, 0, 0, 4, 1, 0, 2, 3, 0, 0, 1, 6, 0, 2, 1, 1, 0, 3, 0, 0, 2, 1, 0, 0, 0)
# 37 documents, 17 of them empty; 147 rows, so the kernels run several row blocks
CU_MANY = tuple(3 * sum(_MANY[:i]) for i in range(len(_MANY) + 1))


def _case(dt, W, chan, *, B=2, T=7, H=3, D=5, cu=None, prev=False, res=False, mask=None):
    lay = f"cu{len(cu) - 1}n{cu[-1]}" if cu else f"B{B}T{T}"
    cid = (f"{dt}-W{W}-{'chan' if chan else 'head'}-{lay}-H{H}-D{D}-{'prev' if prev else 'noprev'}-"
           f"{'res' if res else 'nores'}-mask{mask}")
    return pytest.param(dict(dt=dt, W=W, chan=chan, B=B, T=T, H=H, D=D, cu=cu, prev=prev, res=res, mask=mask),
                        id=cid)


def _cases():
    out = []
    for W in (1, 2, 3):
        for chan in (False, True):
            out += [
                _case("fp32", W, chan, B=2, T=7, H=3, D=5, prev=True),
                _case("fp32", W, chan, B=1, T=63, H=3, D=24, prev=W != 2, res=True, mask="hd"),
                _case("fp32", W, chan, B=2, T=1, H=3, D=24, prev=True, mask="d"),
                _case("fp32", W, chan, H=3, D=5, cu=CU_SMALL, prev=True, res=True, mask="d"),
                _case("fp32", W, chan, H=3, D=40, cu=CU_LONG, prev=W == 2, mask="hd"),
            ]
    for W in (1, 3):
        for chan in (False, True):
            out += [
                _case("bf16", W, chan, B=2, T=63, H=3, D=24, prev=True, res=True, mask="hd"),
                _case("bf16", W, chan, H=3, D=40, cu=CU_LONG, prev=True, res=W == 1, mask="d"),
            ]
    out += [_case("fp16", 2, True, H=3, D=24, cu=CU_SMALL, prev=True, res=True, mask="hd")]
    out += [  # many documents, empty ones first, in runs and last: the kernels' binary search over cu
        _case("fp32", 2, True, H=2, D=5, cu=CU_MANY, prev=True, res=True, mask="d"),
        _case("fp32", 3, False, H=2, D=6, cu=CU_MANY, prev=False),
    ]
    return out


def _inputs(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt, W, H, D = DT[c["dt"]], c["W"], c["H"], c["D"]
    cu = None
    if c["cu"] is None:
        B = c["B"]
        x = torch.randn(B, c["T"], H, D, generator=g)
    else:
        cu = torch.tensor(c["cu"], dtype=torch.int32)
        B = cu.numel() - 1
        x = torch.randn(int(cu[-1]), H, D, generator=g)
    w = torch.randn(*((H, D) if c["chan"] else (H,)), W + 1, generator=g)
    prev = torch.randn(B, W, H, D, generator=g) if c["prev"] else None
    mask = {None: None, "hd": torch.rand(H, D, generator=g) < 0.5, "d": torch.arange(D) % 2 == 0}[c["mask"]]
    dy = torch.randn(x.shape, generator=g)
    to = lambda t: None if t is None else t.to(DEVICE, dt)  # noqa: E731
    cast = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dict(x=to(x), w=to(w), prev=to(prev), dy=to(dy), cu=cast(cu), mask=cast(mask), res=c["res"])


def _run(fn, inp):
    """Output and grads (x, w[, prev]) of fn(x, w, prev)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (inp["x"], inp["w"], inp["prev"]) if t is not None]
    prev = leaves[2] if len(leaves) > 2 else None
    y = fn(leaves[0], leaves[1], prev)
    grads = torch.autograd.grad(y, leaves, inp["dy"].to(y.dtype))
    return [y.detach()] + list(grads)


def _assert_close(name, got, ref, dt):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    got, ref = got.float(), ref.float()
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?)"
    err = (got - ref).abs().max().item()
    bound = TOL[dt] * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{name}: max abs err {err:.3e} > {bound:.3e}"


def _fns(inp):
    kw = dict(cu_seqlens=inp["cu"], residual=inp["res"], channel_mask=inp["mask"])
    ref = lambda x, w, p: naive.causal_mix(x, w, prev=p, **kw)  # noqa: E731
    fused = lambda x, w, p: tm.causal_mix(x, w, prev=p, **kw)  # noqa: E731
    return ref, fused


def _f32(inp):
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inp.items()}


@pytest.mark.parametrize("c", _cases())
def test_matches_naive(c):
    inp = _inputs(c)
    dt = DT[c["dt"]]
    ref_fn, fused_fn = _fns(inp)
    got = _run(fused_fn, inp)
    ref = _run(ref_fn, _f32(inp))
    assert all(t.dtype == dt for t in got)
    for name, a, b in zip(("out", "dx", "dweight", "dprev"), got, ref):
        _assert_close(name, a, b, dt)


def test_mixed_dtypes_bf16_x_fp32_weight_and_prev():
    c = dict(dt="bf16", W=2, chan=True, B=2, T=7, H=3, D=24, cu=None, prev=True, res=True, mask="hd")
    inp = _inputs(c)
    inp["w"], inp["prev"] = inp["w"].float(), inp["prev"].float()
    ref_fn, fused_fn = _fns(inp)
    got = _run(fused_fn, inp)
    ref = _run(ref_fn, _f32(inp))
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    for name, a, b in zip(("out", "dx", "dweight", "dprev"), got, ref):
        _assert_close(name, a, b, torch.bfloat16)


def test_per_head_matches_fused_kv_shift():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 3, 24, generator=g).to(DEVICE)
    w = torch.randn(3, 3, generator=g).to(DEVICE)
    prev = torch.randn(4, 2, 3, 24, generator=g).to(DEVICE)
    cu = torch.tensor(CU_SMALL, dtype=torch.int32, device=DEVICE)
    _assert_close("out", tm.causal_mix(x, w, cu_seqlens=cu, prev=prev),
                  tk.kv_shift(x, w, cu_seqlens=cu, prev=prev), torch.float32)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 7, 24, generator=g).to(DEVICE).transpose(1, 2)  # (B, T, H, D) view, not contiguous
    w = torch.randn(3, 24, 4, generator=g).to(DEVICE).transpose(0, 1).contiguous().transpose(0, 1)
    m = torch.ones(24, dtype=torch.bool, device=DEVICE)
    _assert_close("out", tm.causal_mix(x, w, channel_mask=m), naive.causal_mix(x, w, channel_mask=m), torch.float32)


def test_backward_is_deterministic():
    c = dict(dt="fp32", W=3, chan=True, B=1, T=63, H=3, D=40, cu=None, prev=True, res=True, mask="hd")
    inp = _inputs(c)
    _, fused_fn = _fns(inp)
    for u, v in zip(_run(fused_fn, inp), _run(fused_fn, inp)):
        assert torch.equal(u, v)


@pytest.mark.parametrize("cu", [None, (0, 50, 51, 51, 130, 200)], ids=["padded", "packed"])
def test_backward_with_several_row_blocks_per_program(monkeypatch, cu):
    """One backward program per head walks all row blocks (ITERS > 1) and sums dweight across them."""
    monkeypatch.setattr(tm, "_MAX_PROGRAMS", 3)  # H = 3: one program per head
    c = dict(dt="fp32", W=3, chan=True, B=3, T=63, H=3, D=5, cu=cu, prev=True, res=True, mask="hd")
    inp = _inputs(c)
    ref_fn, fused_fn = _fns(inp)
    for name, a, b in zip(("out", "dx", "dweight", "dprev"), _run(fused_fn, inp), _run(ref_fn, inp)):
        _assert_close(name, a, b, torch.float32)


def _saved_during(fn):
    """The tensors autograd saves while fn() runs (packed by the saved-tensor hooks)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("cu", [None, CU_MANY], ids=["padded", "packed"])
def test_constant_weight_keeps_no_x_and_matches_naive(cu):
    """Key offset's and smear's fixed taps: the backward needs only dy and the weight, so x is not saved;
    dx and dprev still equal the reference. A learned weight keeps x (its gradient reads x's taps)."""
    c = dict(dt="fp32", W=2, chan=True, B=2, T=63, H=2, D=6, cu=cu, prev=True, res=False, mask="d")
    inp = _inputs(c)
    kw = dict(cu_seqlens=inp["cu"], channel_mask=inp["mask"])
    x, prev = (inp[k].detach().clone().requires_grad_(True) for k in ("x", "prev"))
    big = lambda t: t.numel() >= x.numel()  # noqa: E731  (x itself or a copy of it)
    y, saved = _saved_during(lambda: tm.causal_mix(x, inp["w"], prev=prev, **kw))
    assert not any(big(t) for t in saved), [tuple(t.shape) for t in saved]
    got = torch.autograd.grad(y, (x, prev), inp["dy"])
    xr, pr = (inp[k].detach().clone().requires_grad_(True) for k in ("x", "prev"))
    ref = torch.autograd.grad(naive.causal_mix(xr, inp["w"], prev=pr, **kw), (xr, pr), inp["dy"])
    for name, a, b in zip(("dx", "dprev"), got, ref):
        _assert_close(name, a, b, torch.float32)
    _, saved = _saved_during(lambda: tm.causal_mix(x, inp["w"].clone().requires_grad_(True), prev=prev, **kw))
    assert any(big(t) for t in saved)


def test_fp64_falls_back_to_naive():
    x = torch.randn(2, 7, 3, 5, dtype=torch.float64, device=DEVICE)
    w = torch.randn(3, 5, 3, dtype=torch.float64, device=DEVICE)
    assert torch.equal(tm.causal_mix(x, w, residual=True), naive.causal_mix(x, w, residual=True))


def test_dispatch_triton_matches_naive_and_validates():
    c = dict(dt="fp32", W=2, chan=False, B=2, T=7, H=3, D=6, cu=CU_SMALL, prev=True, res=True, mask="d")
    inp = _inputs(c)
    kw = dict(cu_seqlens=inp["cu"], prev=inp["prev"], residual=True, channel_mask=inp["mask"])
    _assert_close("out", mix_api.causal_mix(inp["x"], inp["w"], impl="triton", **kw),
                  mix_api.causal_mix(inp["x"], inp["w"], impl="naive", **kw), torch.float32)
    with pytest.raises(ValueError, match="weight must have W"):
        mix_api.causal_mix(inp["x"], torch.randn(3, 5, device=DEVICE), cu_seqlens=inp["cu"], impl="triton")


# ---------------------------------------------------------------------------------------------
# custom ops: schema/fake/autograd checks and graph capture


def _op_args(prev=True, packed=True):
    g = torch.Generator().manual_seed(3)
    H, D, W = 3, 6, 2
    cu = torch.tensor(CU_SMALL, dtype=torch.int32, device=DEVICE) if packed else None
    x = torch.randn(*((11,) if packed else (2, 7)), H, D, generator=g).to(DEVICE)
    w = torch.randn(H, D, W + 1, generator=g).to(DEVICE)
    p = torch.randn(cu.numel() - 1 if packed else 2, W, H, D, generator=g).to(DEVICE) if prev else None
    return x, w, p, cu


@pytest.mark.parametrize("prev,packed", [(False, False), (True, False), (True, True)],
                         ids=["plain", "prev", "packed-prev"])
def test_opcheck_mix_fwd(prev, packed):
    x, w, p, cu = _op_args(prev, packed)
    req = lambda t: None if t is None else t.clone().requires_grad_(True)  # noqa: E731
    torch.library.opcheck(torch.ops.kvshift.mix_fwd.default, (req(x), req(w), req(p), cu))


@pytest.mark.parametrize("with_x,dy_dtype", [(True, None), (False, None), (True, torch.bfloat16)],
                         ids=["dweight", "no-dweight", "dweight-bf16-dy"])
def test_opcheck_mix_bwd(with_x, dy_dtype):
    """The fake matches the real op, also when dy's dtype differs from x's (dx takes x's)."""
    x, w, p, cu = _op_args()
    dy = torch.randn_like(x, dtype=dy_dtype)
    torch.library.opcheck(torch.ops.kvshift.mix_bwd.default, (dy, x if with_x else None, w, p, cu))


def _layer(x, w, prev, mask):
    return (tm.causal_mix(x, w, prev=prev, residual=True, channel_mask=mask).square()).sum()


@pytest.mark.parametrize("learned", [True, False], ids=["learned-weight", "constant-weight"])
@pytest.mark.parametrize("backend", ["aot_eager"] + (["inductor"] if DEVICE == "cuda" else []))
def test_compile_fullgraph_keeps_the_op(backend, learned):
    """No graph break around the custom op, which stays a node of the graph; fwd and bwd equal eager."""
    x, w, p, _ = _op_args(packed=False)
    w = w[..., 0, :].contiguous()  # per-head weight (H, W+1)
    mask = torch.arange(6, device=DEVICE) < 4
    x, p = (t.clone().requires_grad_(True) for t in (x, p))
    w = w.clone().requires_grad_(learned)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(_layer, fullgraph=True, backend=record)(x, w, p, mask)
    assert any(n.target is torch.ops.kvshift.mix_fwd.default for gm in graphs for n in gm.graph.nodes)
    torch._dynamo.reset()
    compiled = torch.compile(_layer, fullgraph=True, backend=backend)
    leaves = (x, w, p) if learned else (x, p)
    comp_out = compiled(x, w, p, mask)
    comp_grads = torch.autograd.grad(comp_out, leaves)
    eager_out = _layer(x, w, p, mask)
    eager_grads = torch.autograd.grad(eager_out, leaves)
    _assert_close("out", comp_out.detach(), eager_out.detach(), torch.float32)
    for a, b in zip(comp_grads, eager_grads):
        _assert_close("grad", a, b, torch.float32)
