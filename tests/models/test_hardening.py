"""LM.generate refuses arguments it cannot honour with a ValueError naming the argument."""

import pytest
import torch

from kvshift import LM, ModelConfig


@pytest.fixture(scope="module")
def lm():
    return LM(ModelConfig.from_name("debug"), seed=0).eval()


@pytest.mark.parametrize("ids,kw,match", [
    (torch.zeros(1, 0, dtype=torch.long), {}, "non-empty prompt"),
    (torch.zeros(0, dtype=torch.long), {}, "non-empty prompt"),
    (torch.zeros(1, 3, dtype=torch.long), {"top_k": 0}, "top_k must be a positive int"),
    (torch.zeros(1, 3, dtype=torch.long), {"top_k": -2}, "top_k must be a positive int"),
    (torch.zeros(1, 3, dtype=torch.long), {"temperature": float("nan")}, "temperature must be a finite number"),
    (torch.zeros(1, 3, dtype=torch.long), {"temperature": float("inf")}, "temperature must be a finite number"),
], ids=["empty", "empty-1d", "top_k=0", "top_k<0", "nan", "inf"])
def test_generate_rejects(lm, ids, kw, match):
    with pytest.raises(ValueError, match=match):
        lm.generate(ids, 4, **kw)


def test_generate_still_samples(lm):
    g = torch.Generator().manual_seed(0)
    out = lm.generate(torch.zeros(2, 3, dtype=torch.long), 4, top_k=1, temperature=0.7, generator=g)
    assert out.shape == (2, 7)
    assert torch.equal(out, lm.generate(torch.zeros(2, 3, dtype=torch.long), 4, temperature=0))  # top_k=1 is greedy
