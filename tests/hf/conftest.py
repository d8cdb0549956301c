"""Fixtures for the transformers integration: skipped as a whole when the `hf` extra is missing."""

import pytest
import torch

pytest.importorskip("transformers")

import kvshift.hf  # noqa: E402,F401  (registers the Auto classes)
from kvshift import LM, ModelConfig  # noqa: E402

def tiny_tokenizer(vocab_size: int = 300):
    from kvshift.hf.testing import tiny_tokenizer as make

    return make(vocab_size)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


def make_lm(seed: int = 0, **overrides) -> LM:
    """The debug preset with shift coefficients moved off the paper init, so every tap matters."""
    cfg = ModelConfig.from_name("debug", **overrides)
    lm = LM(cfg, seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "shift_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return lm


@pytest.fixture
def lm_factory():
    return make_lm
