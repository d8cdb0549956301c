"""Fused Triton KV shift (plain and shift+RoPE, fwd/bwd, decode) against the naive reference.

Without CUDA the kernels run under the Triton interpreter on CPU, so shapes stay tiny. Every case
compares the output and every gradient (x, weight, prev; cos/sin are not differentiated).
Low-precision cases compare against the naive op evaluated in fp32 on the same (rounded) inputs:
the kernel accumulates in fp32 and rounds once, so the fp32 reference is the exact target.
"""

import os

import torch

if not torch.cuda.is_available():
    # must be set before the kernels are decorated (first import of kvshift.ops.shift.triton)
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from kvshift.ops import shift as shift_api  # noqa: E402
from kvshift.ops.rope import apply_rope, rope_cos_sin  # noqa: E402
from kvshift.ops.shift import naive  # noqa: E402
from kvshift.ops.shift import triton as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# max |kernel - reference| <= TOL * max(1, max |reference|), per tensor
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# packed documents: an empty one and a length-1 one among them
CU_SMALL = (0, 3, 3, 4, 11)
CU_LONG = (0, 1, 40, 40, 63)
_MANY = (0, 2, 0, 0, 1, 5, 0, 3, 1, 1, 0, 7, 2, 0, 0, 4, 1, 0, 2, 3, 0, 0, 1, 6, 0, 2, 1, 1, 0, 3, 0, 0, 2, 1, 0, 0, 0)
# 37 documents, 17 of them empty; 147 rows, so the kernels run several row blocks
CU_MANY = tuple(3 * sum(_MANY[:i]) for i in range(len(_MANY) + 1))


def _case(kind, W, dt, *, B=2, T=7, H=3, D=5, cu=None, prev=False, bcast_cos=False):
    lay = f"cu{len(cu) - 1}n{cu[-1]}" if cu else f"B{B}T{T}"
    cid = f"{kind}-W{W}-{lay}-H{H}-D{D}-{'prev' if prev else 'noprev'}-{dt}" + ("-cos1" if bcast_cos else "")
    return pytest.param(dict(kind=kind, W=W, dt=dt, B=B, T=T, H=H, D=D, cu=cu, prev=prev, bcast_cos=bcast_cos),
                        id=cid)


def _cases():
    out = []
    for W in (1, 2, 3, 4):
        for prev in (False, True):
            out += [
                _case("shift", W, "fp32", B=2, T=7, H=3, D=5, prev=prev),
                _case("shift", W, "fp32", B=1, T=63, H=1, D=24, prev=prev),
                _case("shift", W, "fp32", B=2, T=1, H=3, D=24, prev=prev),
                _case("shift", W, "fp32", H=3, D=5, cu=CU_SMALL, prev=prev),
                _case("shift", W, "fp32", H=1, D=24, cu=CU_LONG, prev=prev),
                _case("rope", W, "fp32", B=2, T=7, H=3, D=6, prev=prev, bcast_cos=True),
                _case("rope", W, "fp32", B=1, T=63, H=1, D=40, prev=prev),
                _case("rope", W, "fp32", B=2, T=1, H=3, D=24, prev=prev),
                _case("rope", W, "fp32", H=3, D=6, cu=CU_SMALL, prev=prev),
                _case("rope", W, "fp32", H=1, D=24, cu=CU_LONG, prev=prev),
            ]
    for W in (2, 4):
        for prev in (False, True):
            out += [
                _case("shift", W, "bf16", B=2, T=63, H=3, D=24, prev=prev),
                _case("shift", W, "bf16", H=3, D=5, cu=CU_LONG, prev=prev),
                _case("rope", W, "bf16", B=2, T=63, H=3, D=40, prev=prev),
                _case("rope", W, "bf16", H=3, D=24, cu=CU_LONG, prev=prev),
            ]
    out += [
        _case("shift", 2, "fp16", B=2, T=63, H=3, D=24, prev=True),
        _case("rope", 3, "fp16", H=3, D=40, cu=CU_SMALL, prev=True),
    ]
    out += [  # many documents, empty ones first, in runs and last: the kernels' binary search over cu
        _case("shift", 3, "fp32", H=2, D=5, cu=CU_MANY, prev=True),
        _case("rope", 2, "fp32", H=2, D=6, cu=CU_MANY, prev=True),
        _case("rope", 4, "bf16", H=2, D=24, cu=CU_MANY, prev=False),
    ]
    return out


def _inputs(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt, W, H, D = DT[c["dt"]], c["W"], c["H"], c["D"]
    cu = None
    if c["cu"] is None:
        B, T = c["B"], c["T"]
        x = torch.randn(B, T, H, D, generator=g)
        positions = torch.arange(T).expand(1 if c["bcast_cos"] else B, T) + 5
    else:
        cu = torch.tensor(c["cu"], dtype=torch.int32)
        B, N = cu.numel() - 1, int(cu[-1])
        x = torch.randn(N, H, D, generator=g)
        positions = torch.randint(0, 100, (N,), generator=g)
    w = torch.randn(H, W, generator=g)
    prev = torch.randn(B, W - 1, H, D, generator=g) if c["prev"] else None
    dy = torch.randn(x.shape, generator=g)
    cos = sin = None
    if c["kind"] == "rope":
        cos, sin = rope_cos_sin(positions, D)
    to = lambda t: None if t is None else t.to(DEVICE, dt)  # noqa: E731
    cast = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dict(x=to(x), w=to(w), prev=to(prev), dy=to(dy), cu=cast(cu), cos=cast(cos), sin=cast(sin))


def _run(fn, inp):
    """Output and grads (x, w, prev) of fn; grads of zero-size or unused leaves read as zeros."""
    leaves = [inp["x"], inp["w"]] + ([inp["prev"]] if inp["prev"] is not None else [])
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    x, w = leaves[0], leaves[1]
    prev = leaves[2] if len(leaves) > 2 else None
    y = fn(x, w, prev)
    grads = torch.autograd.grad(y, leaves, inp["dy"].to(y.dtype), allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, leaves)]
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


def _fns(c, inp):
    cu, cos, sin = inp["cu"], inp["cos"], inp["sin"]
    if c["kind"] == "shift":
        ref = lambda x, w, p: (naive.shift_padded(x, w, p) if cu is None  # noqa: E731
                               else naive.shift_varlen(x, w, cu, p))
        fused = lambda x, w, p: tk.kv_shift(x, w, cu_seqlens=cu, prev=p)  # noqa: E731
    else:
        ref = lambda x, w, p: naive.shift_rope(x, w, cos, sin, cu_seqlens=cu, prev=p)  # noqa: E731
        fused = lambda x, w, p: tk.shift_rope(x, w, cos, sin, cu_seqlens=cu, prev=p)  # noqa: E731
    return ref, fused


@pytest.mark.parametrize("c", _cases())
def test_matches_naive(c):
    inp = _inputs(c)
    dt = DT[c["dt"]]
    ref_fn, fused_fn = _fns(c, inp)
    got = _run(fused_fn, inp)
    ref_inp = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inp.items()}
    ref = _run(ref_fn, ref_inp)
    assert got[0].dtype == dt and got[1].dtype == dt and got[2].dtype == dt
    for name, a, b in zip(("out", "dx", "dweight", "dprev"), got, ref):
        _assert_close(name, a, b, dt)


def test_mixed_dtypes_bf16_x_fp32_weight():
    c = dict(kind="rope", W=2, dt="bf16", B=2, T=7, H=3, D=24, cu=None, prev=True, bcast_cos=False)
    inp = _inputs(c)
    inp["w"] = inp["w"].float()
    inp["prev"] = inp["prev"].float()
    ref_fn, fused_fn = _fns(c, inp)
    got = _run(fused_fn, inp)
    ref = _run(ref_fn, {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                        for k, v in inp.items()})
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    for name, a, b in zip(("out", "dx", "dweight", "dprev"), got, ref):
        _assert_close(name, a, b, torch.bfloat16)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 7, 24, generator=g).to(DEVICE).transpose(1, 2)  # (B, T, H, D) view, not contiguous
    w = torch.randn(3, 3, generator=g).to(DEVICE)
    cos, sin = rope_cos_sin(torch.arange(7).to(DEVICE)[None], 24)
    _assert_close("shift", tk.kv_shift(x, w), naive.shift_padded(x, w), torch.float32)
    _assert_close("rope", tk.shift_rope(x, w, cos, sin), naive.shift_rope(x, w, cos, sin), torch.float32)
    cos_b = cos.expand(2, 7, 12)  # batch-broadcast view (stride 0) next to a contiguous sin
    sin_b = sin.expand(2, 7, 12).contiguous()
    _assert_close("rope-bcast", tk.shift_rope(x, w, cos_b, sin_b), naive.shift_rope(x, w, cos, sin), torch.float32)


def test_backward_is_deterministic():
    c = dict(kind="rope", W=4, dt="fp32", B=1, T=63, H=3, D=40, cu=None, prev=True, bcast_cos=False)
    inp = _inputs(c)
    _, fused_fn = _fns(c, inp)
    a, b = _run(fused_fn, inp), _run(fused_fn, inp)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("packed", [False, True])
def test_empty_head_dim_gives_zero_weight_grad(packed):
    """D = 0: no kernel runs, and the weight's gradient is zero, not the sum of an unwritten buffer."""
    from kvshift import kv_shift
    shape = (11, 3, 0) if packed else (2, 5, 3, 0)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32, device=DEVICE) if packed else None
    x = torch.zeros(shape, device=DEVICE, requires_grad=True)
    w = torch.randn(3, 2, device=DEVICE, requires_grad=True)
    kv_shift(x, w, cu_seqlens=cu, impl="triton").sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_fp64_falls_back_to_naive():
    x = torch.randn(2, 7, 3, 5, dtype=torch.float64, device=DEVICE)
    w = torch.randn(3, 2, dtype=torch.float64, device=DEVICE)
    assert torch.equal(tk.kv_shift(x, w), naive.shift_padded(x, w))


def test_is_available():
    assert tk.is_available()
    assert shift_api.triton_available()


# ---------------------------------------------------------------------------------------------
# public dispatcher


def test_dispatch_shift_rope_matches_naive():
    c = dict(kind="rope", W=2, dt="fp32", B=2, T=7, H=3, D=6, cu=CU_SMALL, prev=True, bcast_cos=False)
    inp = _inputs(c)
    args = (inp["x"], inp["w"], inp["cos"], inp["sin"])
    kw = dict(cu_seqlens=inp["cu"], prev=inp["prev"])
    _assert_close("out", shift_api.shift_rope(*args, impl="triton", **kw),
                  shift_api.shift_rope(*args, impl="naive", **kw), torch.float32)
    _assert_close("out", shift_api.kv_shift(inp["x"], inp["w"], impl="triton", **kw),
                  shift_api.kv_shift(inp["x"], inp["w"], impl="naive", **kw), torch.float32)


def test_dispatch_shift_rope_rejects_bad_inputs():
    x = torch.randn(2, 7, 3, 5)
    w = torch.randn(3, 2)
    cos, sin = rope_cos_sin(torch.arange(7)[None], 6)
    with pytest.raises(ValueError, match="even head dim"):
        shift_api.shift_rope(x, w, cos, sin, impl="naive")
    x = torch.randn(2, 7, 3, 6)
    with pytest.raises(ValueError, match="cos must have shape"):
        shift_api.shift_rope(x, w, cos[:, :5], sin[:, :5], impl="naive")
    with pytest.raises(ValueError, match="impl"):
        shift_api.shift_rope(x, w, cos, sin, impl="cuda")


# ---------------------------------------------------------------------------------------------
# custom ops: schema/fake/autograd checks and graph capture


def _op_samples():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 3, 6, generator=g).to(DEVICE)
    w = torch.randn(3, 3, generator=g).to(DEVICE)
    prev = torch.randn(2, 2, 3, 6, generator=g).to(DEVICE)
    cos, sin = rope_cos_sin(torch.arange(7).to(DEVICE)[None], 6)
    cu = torch.tensor(CU_SMALL, dtype=torch.int32, device=DEVICE)
    xp = torch.randn(11, 3, 6, generator=g).to(DEVICE)
    prevp = torch.randn(4, 2, 3, 6, generator=g).to(DEVICE)
    cosp, sinp = rope_cos_sin(torch.arange(11).to(DEVICE), 6)
    req = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    return {
        "plain": (req(x), req(w), None, None, None, None),
        "rope-prev": (req(x), req(w), req(prev), None, cos, sin),
        "varlen-rope-prev": (req(xp), req(w), req(prevp), cu, cosp, sinp),
    }


@pytest.mark.parametrize("sample", ["plain", "rope-prev", "varlen-rope-prev"])
def test_opcheck_shift_fwd(sample):
    args = _op_samples()[sample]
    torch.library.opcheck(torch.ops.kvshift.shift_fwd.default, args)


def test_opcheck_shift_bwd():
    x, w, prev, cu, cos, sin = (a.detach() if isinstance(a, torch.Tensor) else a
                                for a in _op_samples()["varlen-rope-prev"])
    dy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.kvshift.shift_bwd.default, (dy, x, w, prev, cu, cos, sin))


def _layer(x, w, prev, cos, sin):
    return (tk.shift_rope(x, w, cos, sin, prev=prev) * tk.kv_shift(x, w, prev=prev)).sum()


@pytest.mark.parametrize("backend", ["aot_eager"] + (["inductor"] if DEVICE == "cuda" else []))
def test_compile_fullgraph(backend):
    """No graph break around the custom ops; fwd and bwd equal eager (inductor only on CUDA)."""
    x, w, prev, _, cos, sin = _op_samples()["rope-prev"]
    torch._dynamo.reset()
    compiled = torch.compile(_layer, fullgraph=True, backend=backend)
    eager_grads = torch.autograd.grad(_layer(x, w, prev, cos, sin), (x, w, prev))
    comp_out = compiled(x, w, prev, cos, sin)
    comp_grads = torch.autograd.grad(comp_out, (x, w, prev))
    _assert_close("out", comp_out.detach(), _layer(x, w, prev, cos, sin).detach(), torch.float32)
    for a, b in zip(comp_grads, eager_grads):
        _assert_close("grad", a, b, torch.float32)


# ---------------------------------------------------------------------------------------------
# decode helper


def _decode_inputs(W, D=6, B=2, H=3, S=5, dt=torch.float32, seed=3, rep=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dt)  # noqa: E731
    cos, sin = rope_cos_sin(torch.tensor([[4], [9]])[:B].to(DEVICE), D)
    return dict(q=r(B, 1, H * rep, D), k_new=r(B, 1, H, D), v_new=r(B, 1, H, D), w_k=r(H, W), w_v=r(H, W),
                raw_k=r(B, W - 1, H, D), raw_v=r(B, W - 1, H, D), cos=cos, sin=sin,
                k_cache=r(B, S, H, D), v_cache=r(B, S, H, D), pos=3)


@pytest.mark.parametrize("W", [1, 2, 4], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("rep", [1, 3], ids=lambda r: f"rep{r}")
def test_decode_step_matches_naive(W, dt, rep):
    """q RoPE, k/v shift (+ RoPE), cache append and the in-place raw-state update, against the reference."""
    a = _decode_inputs(W, D=40 if dt == "bf16" else 6, dt=DT[dt], rep=rep)
    b = {k: (v.float().clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}  # fp32 reference
    raw_before = a["raw_k"].clone()
    q_a, rk_a, rv_a = tk.shift_rope_decode(**a)
    q_b, rk_b, rv_b = tk.shift_rope_decode_naive(**b)
    _assert_close("q_rot", q_a, q_b, DT[dt])
    _assert_close("k_cache", a["k_cache"], b["k_cache"], DT[dt])
    _assert_close("v_cache", a["v_cache"], b["v_cache"], DT[dt])
    assert rk_a is a["raw_k"] and rv_a is a["raw_v"]  # advanced in place
    for u, v in ((rk_a, rk_b), (rv_a, rv_b)):
        assert torch.equal(u.float(), v.float())
    if W > 2:
        assert torch.equal(a["raw_k"][:, 0], raw_before[:, 1])
    if W > 1:
        assert torch.equal(a["raw_k"][:, -1], a["k_new"][:, 0])


def test_opcheck_decode():
    a = _decode_inputs(2, rep=2)
    torch.library.opcheck(torch.ops.kvshift.shift_rope_decode.default, tuple(a.values()))


def test_decode_token_by_token_equals_full_forward():
    W, B, T, H, D = 3, 2, 7, 3, 6
    g = torch.Generator().manual_seed(4)
    k = torch.randn(B, T, H, D, generator=g).to(DEVICE)
    v = torch.randn(B, T, H, D, generator=g).to(DEVICE)
    w_k, w_v = torch.randn(H, W, generator=g).to(DEVICE), torch.randn(H, W, generator=g).to(DEVICE)
    cos, sin = rope_cos_sin(torch.arange(T).to(DEVICE)[None], D)
    k_full = naive.shift_rope(k, w_k, cos, sin)
    v_full = naive.shift_padded(v, w_v)
    k_cache, v_cache = torch.zeros(B, T, H, D, device=DEVICE), torch.zeros(B, T, H, D, device=DEVICE)
    raw_k, raw_v = torch.zeros(B, W - 1, H, D, device=DEVICE), torch.zeros(B, W - 1, H, D, device=DEVICE)
    q = torch.randn(B, T, H, D, generator=g).to(DEVICE)
    for t in range(T):
        q_rot, raw_k, raw_v = tk.shift_rope_decode(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], w_k, w_v, raw_k,
                                                   raw_v, cos[:, t:t + 1], sin[:, t:t + 1], k_cache, v_cache, t)
        _assert_close("q_rot", q_rot, apply_rope(q[:, t:t + 1], cos[:, t:t + 1], sin[:, t:t + 1]), torch.float32)
    _assert_close("k_cache", k_cache, k_full, torch.float32)
    _assert_close("v_cache", v_cache, v_full, torch.float32)
