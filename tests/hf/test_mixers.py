"""KVShiftForCausalLM with a short causal mixer (ModelConfig.mixer): the fields travel through
config.json, Auto classes load the model with kvshift.LM's logits, generate() with the cache (greedy
across the cache's regrowth, beam search's reordering) equals uncached decoding, and the weights load
back into kvshift.LM; a fresh model starts from the mixers' documented init."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvshift import LM, ModelConfig
from kvshift.hf import KVShiftCache, KVShiftConfig, KVShiftForCausalLM
from kvshift.hf.modeling import load_lm_state

VARIANTS = {
    "dconv": dict(mixer="dconv"),
    "canon": dict(mixer="canon", canon_positions="ABD", attention="vanilla"),
    "canon-gelu": dict(mixer="canon", canon_positions="CD", mlp="gelu"),
    "keyoffset": dict(mixer="keyoffset", keyoffset_layers=[1]),
    "smear": dict(mixer="smear", position="learned"),
}


def mixed_lm(lm_factory, **kw) -> LM:
    lm = lm_factory(seed=3, **kw)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "mixer" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            if name.endswith("embed_mixer.scale"):
                p.fill_(0.8)
    return lm


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_mixer_round_trip_and_generate(variant, lm_factory, tmp_path):
    lm = mixed_lm(lm_factory, **VARIANTS[variant])
    KVShiftForCausalLM.from_lm(lm).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["mixer"] == lm.config.mixer and saved["canon_positions"] == lm.config.canon_positions
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, KVShiftConfig) and cfg.to_model_config() == lm.config
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(model, KVShiftForCausalLM)
    x = torch.randint(1, 97, (2, 61), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = lm(x)
        assert (model(x).logits - ref).abs().max().item() <= 1e-6
        back = LM(cfg.to_model_config(), seed=None).eval()  # and back into our LM
        load_lm_state(back, model.model.state_dict())
        assert torch.equal(back(x), ref)
    # the cache outgrows its first 64 slots: the mixer history comes along
    cache = KVShiftCache()
    with torch.no_grad():
        y = torch.cat([x, x[:, :9]], 1)
        first = model(y[:, :60], past_key_values=cache, use_cache=True).logits
        rest = model(y[:, 60:], past_key_values=cache, use_cache=True).logits
    assert cache.kv.max_seq_len > 64 and (torch.cat([first, rest], 1) - lm(y)).abs().max().item() <= 1e-5
    # greedy: 61 + 8 tokens outgrow the first cache too
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    got = model.generate(x, max_new_tokens=8, **kw)
    assert torch.equal(got, model.generate(x, max_new_tokens=8, use_cache=False, **kw))
    assert torch.equal(got, lm.generate(x, 8, temperature=0))
    # beam search reorders the cache, the mixer history included
    short = x[:, :7]
    beams = model.generate(short, max_new_tokens=7, num_beams=3, num_return_sequences=2, **kw)
    assert torch.equal(beams, model.generate(short, max_new_tokens=7, num_beams=3, num_return_sequences=2,
                                             use_cache=False, **kw))


def test_fresh_model_starts_from_the_mixer_init(tmp_path):
    base = dict(vocab_size=97, dim=48, n_heads=4, n_kv_heads=2, max_seq_len=64)
    dconv = KVShiftForCausalLM(KVShiftConfig(mixer="dconv", **base)).model.layers[0].attention.qkv_mixer
    assert torch.equal(dconv.k, torch.tensor([1.0, 0.0, 0.0]).expand(24, 3))
    canon = KVShiftForCausalLM(KVShiftConfig(mixer="canon", **base)).model
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in canon.named_parameters() if "mixer" in n)
    smear = KVShiftForCausalLM(KVShiftConfig(mixer="smear", **base)).model.embed_mixer
    assert smear.scale.item() == 0 and not smear.gate.any()
    with pytest.raises(ValueError, match="mixer must be one of"):
        KVShiftConfig(mixer="conv")
    with pytest.raises(ValueError, match="keyoffset_layers"):
        KVShiftConfig(keyoffset_layers=[7])
    cfg = KVShiftConfig(mixer="keyoffset", keyoffset_layers=[1, 0], **base)
    assert cfg.to_model_config() == ModelConfig(mixer="keyoffset", keyoffset_layers=(0, 1), **base)
    assert KVShiftConfig.from_model_config(cfg.to_model_config()).to_dict() == cfg.to_dict()
    # a checkpoint without the mixer loads into a dconv model: the missing taps take their identity init
    lm = LM(ModelConfig.from_name("debug"), seed=0).eval()
    KVShiftForCausalLM.from_lm(lm).save_pretrained(tmp_path)
    mc = ModelConfig.from_name("debug", mixer="dconv")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, config=KVShiftConfig.from_model_config(mc)).eval()
    x = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert (model(x).logits - lm(x)).abs().max().item() <= 1e-6


def test_mixer_models_refuse_the_caches_they_cannot_use(lm_factory):
    """generate() swaps its empty DynamicCache for our own cache; what needs rollback or a standard cache is
    refused with the reason, never silently wrong."""
    lm = mixed_lm(lm_factory, mixer="dconv")
    model = KVShiftForCausalLM.from_lm(lm).eval()
    x = torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, max_new_tokens=4)
    with pytest.raises(ValueError, match="cropped|rolled back"):
        model.generate(x, prompt_lookup_num_tokens=2, **kw)
    with pytest.raises(ValueError, match="mixer='dconv'.*StaticCache"):
        model.generate(x, cache_implementation="static", **kw)
    with pytest.raises(ValueError, match="stateless=True: a model with mixer='dconv'"):
        lm.generate(x, 4, temperature=0, stateless=True)
    from kvshift.models import RawKVCache
    with pytest.raises(ValueError, match="cache: a model with mixer='dconv'.*RawKVCache"):
        lm(x, cache=RawKVCache.for_model(lm, 1, 16))
