"""KVShiftForCausalLM: Auto-class round trip, logits equal kvshift.LM's, generate() with our own
cache equals uncached decoding (greedy, sampling, beam), left padding, pipelines."""

import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, pipeline

from kvshift import ModelConfig
from kvshift.hf import KVShiftCache, KVShiftConfig, KVShiftForCausalLM

VARIANTS = {
    "kvshift-gqa-rope": dict(attention="kvshift"),
    "kvshift-alibi": dict(attention="kvshift", position="alibi"),
    "gate-w2-tied": dict(attention="kvshift_gate", shift_window=2, tie_embeddings=True),
    "vanilla": dict(attention="vanilla"),
    "learned-gelu-half": dict(attention="kvshift", position="learned", mlp="gelu", shift_init="half"),
}
# the models generate() runs on: the default options and GPT-2's (learned positions, GELU MLP)
GENERATE_VARIANTS = {"default": {}, "learned-gelu": dict(position="learned", mlp="gelu")}


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_auto_round_trip_logits_equal_lm(variant, lm_factory, tmp_path):
    lm = lm_factory(seed=3, **VARIANTS[variant])
    KVShiftForCausalLM.from_lm(lm).save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "kvshift"
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, KVShiftConfig) and cfg.to_model_config() == lm.config
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(model, KVShiftForCausalLM)
    x = torch.randint(0, lm.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = lm(x), model(x).logits
    assert (got - ref).abs().max().item() <= 1e-6
    if lm.config.tie_embeddings:
        assert model.model.output.weight.data_ptr() == model.model.tok_embeddings.weight.data_ptr()


def test_config_validates_and_aliases():
    with pytest.raises(ValueError, match="attention"):
        KVShiftConfig(attention="nope")
    with pytest.raises(ValueError, match="divisible"):
        KVShiftConfig(dim=64, n_heads=4, n_kv_heads=3)
    for field, bad in [("position", "rotary"), ("mlp", "relu"), ("shift_init", "zeros")]:
        with pytest.raises(ValueError, match=f"{field} must be one of"):
            KVShiftConfig(**{field: bad})
    cfg = KVShiftConfig(dim=96, n_heads=6, n_layers=3, max_seq_len=300)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.max_position_embeddings) == (96, 6, 3, 300)
    assert cfg.n_kv_heads == 6 and cfg.ffn_dim == 256  # resolved like ModelConfig
    assert (cfg.position, cfg.mlp, cfg.shift_init) == ("rope", "swiglu", "uniform")
    cfg = KVShiftConfig(dim=96, n_heads=6, mlp="gelu", position="learned", shift_init="half")
    assert cfg.intermediate_size == 384 and cfg.to_model_config() == ModelConfig(dim=96, n_heads=6, mlp="gelu",
                                                                                  position="learned", shift_init="half")
    assert KVShiftConfig.from_model_config(cfg.to_model_config()).to_dict() == cfg.to_dict()


def test_fresh_model_follows_the_config_init():
    """A KVShiftForCausalLM built from a config (not loaded) starts as kvshift.LM does: the shift init
    of shift_init, normal(init_std) position embeddings."""
    cfg = KVShiftConfig(vocab_size=97, dim=48, n_heads=4, n_kv_heads=2, max_seq_len=64, position="learned",
                        mlp="gelu", shift_init="half", shift_window=2)
    model = KVShiftForCausalLM(cfg)
    for layer in model.model.layers:
        for c in layer.attention.shift_coefficients():
            torch.testing.assert_close(c, torch.full((2, 3), 1 / 3))
    w = model.model.pos_embeddings.weight
    assert w.shape == (64, 48) and abs(w.std().item() / cfg.init_std - 1) < 0.05
    uniform = KVShiftForCausalLM(KVShiftConfig(vocab_size=97, dim=48, n_heads=4)).model.layers[0].attention
    assert not torch.equal(uniform.shift_k[:, 0], torch.full((4,), 0.5))  # the paper's U(0,1) draw
    torch.testing.assert_close(uniform.shift_k.sum(1), torch.ones(4))


def test_labels_give_next_token_loss(lm_factory):
    lm = lm_factory()
    model = KVShiftForCausalLM.from_lm(lm).eval()
    x = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = x.clone()
    labels[0, :3] = -100
    out = model(x, labels=labels)
    logits = lm(x)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, ref, atol=1e-6)
    with pytest.raises(ValueError, match="unsupported arguments"):
        model(x, foo=1)


@pytest.fixture(params=list(GENERATE_VARIANTS))
def hf_model(request, lm_factory):
    lm = lm_factory(seed=5, **GENERATE_VARIANTS[request.param])
    return lm, KVShiftForCausalLM.from_lm(lm).eval()


def _count_forward_lengths(model):
    seen = []
    handle = model.model.register_forward_pre_hook(lambda m, args, kw: seen.append(args[0].shape[1]), with_kwargs=True)
    return seen, handle


MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=20, temperature=1.3),
    "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "beam-sample": dict(do_sample=True, num_beams=2),
}


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
def test_generate_cached_equals_uncached(mode, hf_model):
    lm, model = hf_model
    x = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    outs = {}
    for use_cache in (True, False):
        seen, h = _count_forward_lengths(model)
        torch.manual_seed(11)
        outs[use_cache] = model.generate(x, max_new_tokens=9, use_cache=use_cache, pad_token_id=0,
                                         eos_token_id=None, **MODES[mode])
        h.remove()
        if use_cache:  # the cache is really used: a prefill, then one token per step
            assert seen[0] == 7 and set(seen[1:]) == {1}
        else:
            assert seen[-1] == 7 + 8
    assert outs[True].shape[1] == 7 + 9
    assert torch.equal(outs[True], outs[False])


def test_greedy_generate_equals_lm_generate(hf_model):
    lm, model = hf_model
    x = torch.randint(1, 97, (3, 5), generator=torch.Generator().manual_seed(3))
    got = model.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(got, lm.generate(x, 12, temperature=0))


def test_cache_grows_past_its_first_allocation(hf_model):
    lm, model = hf_model
    x = torch.randint(1, 97, (1, 60), generator=torch.Generator().manual_seed(4))
    cached = model.generate(x, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    uncached = model.generate(x, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=False)
    assert torch.equal(cached, uncached)
    cache = KVShiftCache()
    with torch.no_grad():
        out = model(x, past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 60 and cache.kv.max_seq_len == 64
        out2 = model(torch.randint(1, 97, (1, 10)), past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 70 and cache.kv.max_seq_len >= 70 and torch.isfinite(out2.logits).all()
    assert out.logits.shape == (1, 60, 97)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_left_padded_batch_equals_single(use_cache, hf_model):
    lm, model = hf_model
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(1, 97, (n,), generator=g) for n in (3, 8, 5)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                           eos_token_id=None, use_cache=use_cache)
    for i, p in enumerate(prompts):
        single = model.generate(p.view(1, -1), max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(batch[i, T:], single[0, len(p):]), f"row {i}"


def test_pipeline_text_generation(lm_factory, tokenizer, tmp_path):
    lm = lm_factory(seed=5, vocab_size=len(tokenizer))
    model = KVShiftForCausalLM.from_lm(lm)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    gen = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    prompt = "hello world"
    out = gen(prompt, max_new_tokens=6, do_sample=False, return_full_text=False)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    ref = lm.generate(ids, 6, temperature=0)[0, ids.shape[1]:]
    assert out[0]["generated_text"] == tokenizer.decode(ref, skip_special_tokens=True)
    # batched prompts of different lengths: left padding inside the pipeline
    tokenizer.padding_side = "left"
    outs = gen(["hello", "the quick brown fox"], max_new_tokens=4, do_sample=False, return_full_text=False,
               batch_size=2)
    singles = [gen(p, max_new_tokens=4, do_sample=False, return_full_text=False) for p in ["hello", "the quick brown fox"]]
    assert [o[0]["generated_text"] for o in outs] == [s[0]["generated_text"] for s in singles]
