"""The one-op KV shift + RoPE(K) + causal attention (`kvshift.ops.shift.attention`) against the reference.

On the CPU the Triton shift kernels run in the interpreter and the attention part is the op's exact
math implementation, so what is tested here is the recompute-in-backward plumbing: outputs and the
gradients of q, k, v and both coefficient sets, padded and packed, MHA and GQA, windows 1-3. On CUDA
(the device tool) the same tests run in bf16 against the fp32 reference, dense batches through both
cuDNN (the default) and the flash kernels (backend="flash"), packed ones through flash.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from kvshift.ops.rope import rope_cos_sin  # noqa: E402
from kvshift.ops.shift.attention import attention_backend, shift_attention, shift_attention_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32  # flash needs bf16/fp16; the CPU math path is exact
TOL = 2e-2 if CUDA else 2e-5  # max abs error relative to max(1, max |reference|)
# the coefficient gradients sum T * D * H/H_kv products of bf16-rounded inputs: their error grows with that
TOL_W = 5e-2 if CUDA else 2e-5


def _inputs(B, T, H, Hk, D, W, cu, seed=0, Wv=None):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v = r(B, T, H, D), r(B, T, Hk, D), r(B, T, Hk, D)
    w_k, w_v = torch.rand(Hk, W, generator=g), torch.rand(Hk, Wv or W, generator=g)
    cos, sin = rope_cos_sin(torch.arange(T).view(1, T), D)
    if cu is not None:  # one packed row of N = B*T tokens
        N = B * T
        q, k, v = q.reshape(N, H, D), k.reshape(N, Hk, D), v.reshape(N, Hk, D)
        cos, sin = cos.expand(B, T, -1).reshape(N, -1), sin.expand(B, T, -1).reshape(N, -1)
        cu = torch.tensor(cu, dtype=torch.int32)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    return dict(q=dev(q), k=dev(k), v=dev(v), w_k=dev(w_k), w_v=dev(w_v), cos=dev(cos), sin=dev(sin),
                cu=None if cu is None else dev(cu))


def _run(inp, impl, dtype, backend="auto"):
    leaves = [inp[n].to(dtype).requires_grad_() for n in ("q", "k", "v")]
    ws = [inp[n].clone().requires_grad_() for n in ("w_k", "w_v")]
    out = shift_attention(*leaves, *ws, inp["cos"], inp["sin"], cu_seqlens=inp["cu"], impl=impl, backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, leaves + ws, g)
    return [out] + list(grads)


def _close(name, got, ref):
    got, ref = got.float(), ref.float()
    assert got.shape == ref.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite"
    err = (got - ref).abs().max().item()
    tol = TOL_W if name.startswith("dw") else TOL
    assert err <= tol * max(1.0, ref.abs().max().item()), f"{name}: max abs err {err:.3e}"


CASES = [  # B, T, H, Hk, D, W, cu
    (2, 7, 4, 4, 8, 2, None),
    (1, 13, 6, 2, 16, 2, None),       # GQA 3:1, odd T
    (2, 9, 4, 1, 8, 3, None),         # MQA, window 2
    (3, 5, 2, 2, 8, 4, None),         # window 3
    (2, 9, 4, 2, 8, 2, (0, 3, 3, 4, 18)),  # packed: an empty and a length-1 document
]
if CUDA:  # the model's head sizes, and a T that is not a multiple of the kernels' tiles
    CASES += [(2, 200, 8, 2, 64, 2, None), (1, 131, 4, 4, 128, 3, None), (1, 150, 4, 2, 64, 2, (0, 61, 150))]
BACKENDS = ["auto", "flash"] if CUDA else ["auto"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T,H,Hk,D,W,cu", CASES,
                         ids=[f"B{c[0]}T{c[1]}H{c[2]}kv{c[3]}D{c[4]}W{c[5]}{'-packed' if c[6] else ''}" for c in CASES])
def test_fused_matches_reference(B, T, H, Hk, D, W, cu, backend):
    inp = _inputs(B, T, H, Hk, D, W, cu)
    expect = "math" if not CUDA else "flash" if (cu is not None or backend == "flash") else "cudnn"
    assert attention_backend(inp["q"], inp["cu"], backend) == expect
    ref = _run(inp, "naive", torch.float32)
    got = _run(inp, "triton", DTYPE, backend)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dw_k", "dw_v"), got, ref):
        _close(name, a, b)


@pytest.mark.parametrize("Wk,Wv,D", [(2, 3, 8), (3, 1, 8), (1, 2, 8), (2, 3, 48)])
@pytest.mark.parametrize("cu", [None, (0, 4, 5, 11, 18)], ids=["padded", "packed"])
def test_fused_k_and_v_windows_differ(Wk, Wv, D, cu):
    """K and V are shifted by one kernel launch (and un-shifted by one): each keeps its own window; D = 48 (not a
    power of 2) checks that K's two half tiles and V's full tile share the row block."""
    inp = _inputs(2, 9, 4, 2, D, Wk, cu, Wv=Wv)
    ref = _run(inp, "naive", torch.float32)
    got = _run(inp, "triton", DTYPE)
    assert got[4].shape == (2, Wk) and got[5].shape == (2, Wv)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dw_k", "dw_v"), got, ref):
        _close(name, a, b)


def test_coefficient_grads_leave_without_a_copy():
    """The op's backward reduces both coefficient grads into one tensor, K's (H_kv, W_k) block then V's, each
    contiguous, so autograd keeps the two views as .grad (no copy kernel per weight and step): both grads share
    that tensor's storage. Weights in another dtype than fp32 get their grads in their own dtype."""
    inp = _inputs(1, 7, 4, 2, 8, 2, None, Wv=3)
    q, k, v = (inp[n].to(DTYPE).requires_grad_() for n in ("q", "k", "v"))
    w_k, w_v = inp["w_k"].clone().requires_grad_(), inp["w_v"].clone().requires_grad_()
    shift_attention(q, k, v, w_k, w_v, inp["cos"], inp["sin"], impl="triton").float().square().sum().backward()
    assert w_k.grad.is_contiguous() and w_v.grad.is_contiguous()
    assert w_k.grad.untyped_storage().data_ptr() == w_v.grad.untyped_storage().data_ptr()
    ref = _run(inp, "naive", torch.float32)
    w16 = [inp[n].to(torch.bfloat16).requires_grad_() for n in ("w_k", "w_v")]
    out = shift_attention(*(inp[n].to(DTYPE) for n in ("q", "k", "v")), *w16, inp["cos"], inp["sin"], impl="triton")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, out.dtype)
    got = torch.autograd.grad(out, w16, g)
    for name, a, b in zip(("dw_k", "dw_v"), got, ref[4:]):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape, name
        assert (a.float() - b).abs().max() <= 0.05 * max(1.0, b.abs().max().item()), name  # bf16 weights


def test_reference_is_the_unfused_composition():
    """The reference equals naive shift/RoPE + SDPA (causal), so the op means what the layer computes."""
    import torch.nn.functional as F

    from kvshift.ops.shift import naive

    inp = _inputs(2, 6, 4, 2, 8, 2, None)
    inp = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    out = shift_attention_reference(inp["q"], inp["k"], inp["v"], inp["w_k"], inp["w_v"], inp["cos"], inp["sin"])
    k_hat = naive.shift_rope(inp["k"], inp["w_k"], inp["cos"], inp["sin"])
    v_hat = naive.shift_padded(inp["v"], inp["w_v"])
    sd = F.scaled_dot_product_attention(inp["q"].transpose(1, 2), k_hat.transpose(1, 2), v_hat.transpose(1, 2),
                                        is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, sd, rtol=1e-5, atol=1e-5)


def test_saves_raw_not_shifted():
    """Autograd keeps q, raw k, raw v, out and lse (no shifted copies): what a vanilla layer keeps."""
    inp = _inputs(1, 5, 2, 2, 8, 2, None)
    q, k, v = (inp[n].to(DTYPE).requires_grad_() for n in ("q", "k", "v"))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        shift_attention(q, k, v, inp["w_k"], inp["w_v"], inp["cos"], inp["sin"], impl="triton")
    big = [t for t in saved if t.dim() >= 3 and t.shape[-1] == 8]
    assert sum(t.data_ptr() == k.data_ptr() for t in big) == 1 and sum(t.data_ptr() == v.data_ptr() for t in big) == 1
    assert len(big) == 4, [tuple(t.shape) for t in big]  # q, k, v, out


def test_opcheck():
    inp = _inputs(1, 5, 4, 2, 8, 2, None)
    args = (inp["q"].to(DTYPE), inp["k"].to(DTYPE), inp["v"].to(DTYPE), inp["w_k"], inp["w_v"], inp["cos"],
            inp["sin"], None, 5, 8 ** -0.5, attention_backend(inp["q"], None))
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(torch.ops.kvshift.shift_attn_fwd.default, args, test_utils=utils)
    out, lse = torch.ops.kvshift.shift_attn_fwd(*args)
    bwd_args = (torch.randn_like(out),) + args[:7] + (out, lse) + args[7:]
    torch.library.opcheck(torch.ops.kvshift.shift_attn_bwd.default, bwd_args, test_utils=utils[:2])


def test_compile_fullgraph_keeps_the_op():
    inp = _inputs(1, 6, 4, 2, 8, 2, None)

    def f(q, k, v, w_k, w_v):
        return shift_attention(q, k, v, w_k, w_v, inp["cos"], inp["sin"], impl="triton").float().square().sum()

    args = [inp["q"].to(DTYPE), inp["k"].to(DTYPE), inp["v"].to(DTYPE), inp["w_k"], inp["w_v"]]
    args = [a.clone().requires_grad_() for a in args]
    eager = torch.autograd.grad(f(*args), args)
    comp = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(*args), args)
    for name, a, b in zip(("dq", "dk", "dv", "dw_k", "dw_v"), comp, eager):
        _close(name, a, b)  # bf16 on CUDA: the attention backward may sum in another order


def test_backend_comes_from_the_argument_only(monkeypatch):
    """No environment variable steers the kernels: the retired KVSHIFT_ATTENTION is ignored."""
    monkeypatch.setenv("KVSHIFT_ATTENTION", "sdpa")
    inp = _inputs(1, 5, 4, 2, 8, 2, None)
    assert attention_backend(inp["q"], None) == attention_backend(inp["q"], None, "auto")
    shift_attention(inp["q"], inp["k"], inp["v"], inp["w_k"], inp["w_v"], inp["cos"], inp["sin"], impl="naive")


def test_bad_arguments():
    inp = _inputs(1, 5, 4, 2, 8, 2, None)
    with pytest.raises(ValueError, match="backend"):
        shift_attention(inp["q"], inp["k"], inp["v"], inp["w_k"], inp["w_v"], inp["cos"], inp["sin"], backend="sdpa")
    with pytest.raises(ValueError, match="w_k"):
        shift_attention(inp["q"], inp["k"], inp["v"], inp["w_k"][:1], inp["w_v"], inp["cos"], inp["sin"])
    with pytest.raises(ValueError, match="q_rot"):
        shift_attention(inp["q"][:, :, :3], inp["k"], inp["v"], inp["w_k"], inp["w_v"], inp["cos"], inp["sin"])
    with pytest.raises(ValueError, match="impl"):
        shift_attention(inp["q"], inp["k"], inp["v"], inp["w_k"], inp["w_v"], inp["cos"], inp["sin"], impl="x")

