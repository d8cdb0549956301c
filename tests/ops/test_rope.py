"""RoPE: the cat-free form the compiled decode step uses equals apply_rope bit for bit."""

import pytest
import torch

from kvshift.ops.rope import apply_rope, apply_rope_pointwise, rope_cos_sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 1, 3, 8), (1, 5, 2, 6), (3, 4, 1, 2)])
def test_pointwise_rope_equals_apply_rope_exactly(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    B, T, H, D = shape
    x = torch.randn(*shape, generator=g).to(dtype)
    cos, sin = rope_cos_sin(torch.randint(0, 5000, (B, T), generator=g), D)
    assert torch.equal(apply_rope_pointwise(x, cos, sin), apply_rope(x, cos, sin))
    cos1, sin1 = cos[:1], sin[:1]  # a size-1 batch axis broadcasts
    assert torch.equal(apply_rope_pointwise(x, cos1, sin1), apply_rope(x, cos1, sin1))


def test_pointwise_rope_on_packed_rows():
    x = torch.randn(7, 3, 10)
    cos, sin = rope_cos_sin(torch.arange(7), 10)
    assert torch.equal(apply_rope_pointwise(x, cos, sin), apply_rope(x, cos, sin))
