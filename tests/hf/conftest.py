"""Fixtures for the transformers integration: skipped as a whole when the `hf` extra is missing."""

import pytest
import torch

pytest.importorskip("transformers")

import kvshift.hf  # noqa: E402,F401  (registers the Auto classes)
from kvshift import LM, ModelConfig  # noqa: E402

TEXTS = ["the quick brown fox jumps over the lazy dog. " * 3, "KV shifting attention mixes each key with the one before it.",
         "A tiny byte-level BPE for tests: hello world, hello tokens, 0123456789!"] * 4


def tiny_tokenizer(vocab_size: int = 300):
    """Byte-level BPE (any text encodes) wrapped as a transformers fast tokenizer; id 0 = EOS = pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_input_names=["input_ids", "attention_mask"])


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
