"""Fixtures for evaluation tests: a tiny byte-level tokenizer and a tiny exported KV-shift model."""

import pytest
import torch

from kvshift import LM, ModelConfig

def tiny_tokenizer(vocab_size: int = 300):
    from kvshift.hf.testing import tiny_tokenizer as make

    return make(vocab_size)


def tiny_lm(vocab_size: int, seed: int = 0, **kw) -> LM:
    cfg = ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      max_seq_len=1024, **kw)
    lm = LM(cfg, seed=seed).eval()
    with torch.no_grad():  # larger weights than the init: sharper, less uniform predictions
        for name, p in lm.named_parameters():
            if p.dim() == 2 and "shift_" not in name:
                p.mul_(5.0)
    return lm


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(directory, kvshift.LM, tokenizer) of a tiny model saved as KVShiftForCausalLM + tokenizer."""
    pytest.importorskip("transformers")
    from kvshift.hf import KVShiftForCausalLM

    from kvshift.hf.convert import load_tokenizer_for_export

    d = tmp_path_factory.mktemp("hf_model")
    tiny_tokenizer().backend_tokenizer.save(str(d / "tokenizer.json"))
    tok = load_tokenizer_for_export(d / "tokenizer.json")  # as `kvshift export` makes it: BOS prepended
    lm = tiny_lm(len(tok))
    KVShiftForCausalLM.from_lm(lm).save_pretrained(d)
    tok.save_pretrained(d)
    return d, lm, tok
