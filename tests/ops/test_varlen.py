"""The varlen attention op (packed documents, every layer off the fused shift path) against masked softmax
attention: outputs and the gradients of q, k and v, on odd document lengths, with GQA."""

import pytest
import torch

from kvshift.ops.varlen import varlen_attention, varlen_attention_reference


def _inputs(lengths, H, Hk, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    N = sum(lengths)
    q, k, v = (torch.randn(N, h, D, generator=g, dtype=dtype).requires_grad_() for h in (H, Hk, Hk))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("lengths,H,Hk,D", [([5, 1, 9, 3], 4, 4, 8), ([1, 1, 2], 6, 2, 16), ([17], 3, 1, 24),
                                            ([4, 13, 1, 7, 2], 2, 2, 40)])
def test_varlen_equals_masked_softmax_with_gradients(lengths, H, Hk, D):
    q, k, v, cu = _inputs(lengths, H, Hk, D)
    out = varlen_attention(q, k, v, cu, max_seqlen=max(lengths))
    ref = varlen_attention_reference(q, k, v, cu)
    assert out.shape == q.shape and torch.allclose(out, ref, atol=1e-6, rtol=1e-5)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


def test_documents_never_see_each_other():
    q, k, v, cu = _inputs([4, 6], 2, 2, 8)
    out = varlen_attention(q, k, v, cu)
    with torch.no_grad():
        k2, v2 = k.clone(), v.clone()
        k2[:4] += 5.0
        v2[:4] -= 3.0  # change only the first document
    out2 = varlen_attention(q, k2, v2, cu)
    assert torch.equal(out[4:], out2[4:]) and not torch.equal(out[:4], out2[:4])


def test_compiles_with_its_backward():
    q, k, v, cu = _inputs([3, 5], 2, 1, 8)
    f = torch.compile(lambda a, b, c: varlen_attention(a, b, c, cu, max_seqlen=5).square().sum(), backend="aot_eager",
                      fullgraph=True)
    loss = f(q, k, v)
    got = torch.autograd.grad(loss, (q, k, v))
    want = torch.autograd.grad(varlen_attention_reference(q, k, v, cu).square().sum(), (q, k, v))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_bad_inputs_name_the_argument():
    q, k, v, cu = _inputs([3, 5], 4, 2, 8)
    with pytest.raises(ValueError, match="packed"):
        varlen_attention(q[None], k, v, cu)
    with pytest.raises(ValueError, match="multiple of k's heads"):
        varlen_attention(q[:, :3], k, v, cu)
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D int32"):
        varlen_attention(q, k, v, cu.long())
