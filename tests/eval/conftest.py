"""Fixtures for evaluation tests: a tiny exported KV-shift model with a tiny byte-level tokenizer."""

import pytest


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(directory, kvshift.LM, tokenizer) of a tiny model saved as KVShiftForCausalLM + tokenizer."""
    pytest.importorskip("transformers")
    from kvshift.hf.testing import export_tiny

    d = tmp_path_factory.mktemp("hf_model")
    lm, tok = export_tiny(d)
    return d, lm, tok
