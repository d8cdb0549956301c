"""KVShiftForCausalLM on transformers' own caches (rotated raw k / raw v, shifted on read): logits equal
the full forward, and every generate() mode equals uncached decoding, including the ones that need a
rollback (assisted generation with a draft model, prompt-lookup decoding) and static caches."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

from kvshift.hf import KVShiftForCausalLM
from kvshift.hf.modeling import _OUTPUT_CACHE_FIELD as CACHE_KWARG  # generate's name for it: 5.17 or later 5.x

from .conftest import make_lm

VARIANTS = {
    "kvshift-w1": dict(attention="kvshift"),
    "kvshift-w3": dict(attention="kvshift", shift_window=3),
    "gate-w2": dict(attention="kvshift_gate", shift_window=2),
    "clamp": dict(attention="kvshift_clamp"),
    "kshift": dict(attention="kshift"),
    "vshift-w2": dict(attention="vshift", shift_window=2),
    "alibi": dict(attention="kvshift", position="alibi"),
    "learned-gelu": dict(attention="kvshift", position="learned", mlp="gelu", shift_window=2),
    "none": dict(attention="kvshift", position="none"),
    "vanilla": dict(attention="vanilla"),
}
GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


def sharp(lm):
    """Scale the matrices up so greedy decoding is decisive (token ties would make fp noise matter)."""
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.dim() == 2 and "shift_" not in name:
                p.mul_(4.0)
    return lm


def hf(seed=5, dtype=torch.float32, **kw):
    lm = sharp(make_lm(seed=seed, **kw)).to(dtype)
    return lm, KVShiftForCausalLM.from_lm(lm).eval()


def left_padded(lengths, g, vocab=97):
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, T - n:], mask[i, T - n:] = torch.randint(1, vocab, (n,), generator=g), 1
    return ids, mask


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chunked_logits_on_transformers_caches_equal_full_forward(variant, static):
    lm, model = hf(dtype=torch.float64, **VARIANTS[variant])
    g = torch.Generator().manual_seed(1)
    ids, mask = left_padded([13, 8], g)
    ids = torch.cat([ids, torch.randint(1, 97, (2, 5), generator=g)], 1)
    mask = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], 1)
    cache = StaticCache(config=model.config, max_cache_len=24) if static else DynamicCache()
    outs = []
    with torch.no_grad():
        for s, e in [(0, 4), (4, 13), (13, 14), (14, 17), (17, 18)]:
            outs.append(model(ids[:, s:e], attention_mask=mask[:, :e], cache=cache, use_cache=True).logits)
        got = torch.cat(outs, 1)
        assert int(cache.get_seq_length()) == 18
        for i, n in enumerate([13, 8]):
            alone = lm(ids[i:i + 1, 13 - n:])
            assert (got[i:i + 1, 13 - n:] - alone).abs().max().item() <= 1e-6


@pytest.mark.parametrize("variant", ["kvshift-w1", "kvshift-w3", "alibi"])
def test_continue_from_a_cropped_dynamic_cache(variant):
    lm, model = hf(dtype=torch.float64, **VARIANTS[variant])
    g = torch.Generator().manual_seed(2)
    x = torch.randint(1, 97, (2, 15), generator=g)
    alt = torch.randint(1, 97, (2, 4), generator=g)
    cache = DynamicCache()
    with torch.no_grad():
        model(x, cache=cache, use_cache=True)
        cache.crop(-6)  # 9 slots left: the last 6 tokens were rejected
        assert cache.get_seq_length() == 9
        got = model(alt, cache=cache, use_cache=True).logits
        full = lm(torch.cat([x[:, :9], alt], 1))[:, 9:]
    assert (got - full).abs().max().item() <= 1e-6


MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=20, temperature=1.3),
    "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2),
}


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("variant", ["kvshift-w3", "gate-w2", "vshift-w2", "alibi"])
def test_generate_on_transformers_caches_equals_uncached(variant, mode, static):
    _, model = hf(**VARIANTS[variant])
    ids, mask = left_padded([7, 4], torch.Generator().manual_seed(3))
    extra = dict(cache_implementation="static") if static else {}
    outs = {}
    for use_cache in (True, False):
        torch.manual_seed(11)
        outs[use_cache] = model.generate(ids, attention_mask=mask, max_new_tokens=8, use_cache=use_cache,
                                         pad_token_id=0, eos_token_id=None, **MODES[mode],
                                         **(extra if use_cache else {}))
    assert outs[True].shape[1] == 7 + 8
    assert torch.equal(outs[True], outs[False])


def _count_crops(monkeypatch):
    calls = []
    original = DynamicCache.crop

    def crop(self, n):
        calls.append(n)
        return original(self, n)

    monkeypatch.setattr(DynamicCache, "crop", crop)
    return calls


@pytest.mark.parametrize("draft", ["kvshift", "vanilla"])
@pytest.mark.parametrize("variant", ["kvshift-w1", "kvshift-w3", "learned-gelu"])
def test_assisted_generation_with_a_draft_model(variant, draft, monkeypatch):
    """A draft model proposes tokens, the target checks them in one forward and rolls its cache back
    over the rejected ones: the output equals the target's own greedy decoding."""
    _, model = hf(**VARIANTS[variant])
    _, assistant = hf(seed=9, attention=draft)  # another model: many of its proposals are rejected
    crops = _count_crops(monkeypatch)
    x = torch.randint(1, 97, (1, 9), generator=torch.Generator().manual_seed(4))
    want = model.generate(x, max_new_tokens=20, use_cache=False, **GREEDY)
    got = model.generate(x, max_new_tokens=20, assistant_model=assistant, **GREEDY)
    assert torch.equal(got, want)
    assert any(n < 0 for n in crops)  # rejected candidates were really cropped away


@pytest.mark.parametrize("variant", ["kvshift-w1", "kvshift-w3", "alibi", "kshift"])
def test_prompt_lookup_decoding(variant, monkeypatch):
    _, model = hf(**VARIANTS[variant])
    crops = _count_crops(monkeypatch)
    g = torch.Generator().manual_seed(5)
    motif = torch.randint(1, 97, (1, 4), generator=g)
    x = torch.cat([motif, torch.randint(1, 97, (1, 3), generator=g), motif, motif[:, :2]], 1)  # repeats to look up
    want = model.generate(x, max_new_tokens=16, use_cache=False, **GREEDY)
    got = model.generate(x, max_new_tokens=16, prompt_lookup_num_tokens=3, **GREEDY)
    assert torch.equal(got, want)
    assert crops  # candidates were checked and the cache cropped


def test_static_cache_is_reused_and_sized(monkeypatch):
    _, model = hf(**VARIANTS["kvshift-w1"])
    x = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(6))
    cache = StaticCache(config=model.config, max_cache_len=12)
    with torch.no_grad():
        model(x, cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="max_cache_len"):
            model(torch.ones(2, 7, dtype=torch.long), cache=cache, use_cache=True)


def test_bad_cache_and_mask_name_the_argument():
    _, model = hf(**VARIANTS["kvshift-w1"])
    x = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="cache"):
        model(x, cache=object(), use_cache=True)
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=torch.ones(1, 1, 4, 4), cache=DynamicCache(), use_cache=True)
    cache = DynamicCache()
    with torch.no_grad():
        model(x, cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=torch.ones(1, 6), cache=cache, use_cache=True)


def test_static_cache_with_a_compiled_forward():
    """torch.compile traces the forward on a static cache (dynamo, eager backend to stay quick on CPU;
    inductor gives the same tokens but compiles for minutes here)."""
    _, model = hf(**VARIANTS["kvshift-w3"])
    ids, mask = left_padded([6, 4], torch.Generator().manual_seed(7))
    want = model.generate(ids, attention_mask=mask, max_new_tokens=5, use_cache=False, **GREEDY)
    model.forward = torch.compile(model.forward, backend="eager")
    got = model.generate(ids, attention_mask=mask, max_new_tokens=5, cache_implementation="static", **GREEDY)
    assert torch.equal(got, want)


def test_our_own_kvshift_cache_still_generates_but_refuses_rollback():
    from kvshift.hf import KVShiftCache

    _, model = hf(**VARIANTS["kvshift-w1"])
    x = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(8))
    for extra in ({}, dict(num_beams=2)):
        want = model.generate(x, max_new_tokens=5, use_cache=False, **GREEDY, **extra)
        assert torch.equal(model.generate(x, max_new_tokens=5, **{CACHE_KWARG: KVShiftCache()}, **GREEDY, **extra), want)
    with pytest.raises(ValueError, match="cannot be rolled back|can be cropped"):
        model.generate(x[:1], max_new_tokens=5, **{CACHE_KWARG: KVShiftCache()}, prompt_lookup_num_tokens=2, **GREEDY)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_chunked_prefill(static):
    """generate(prefill_chunk_size=...) splits the prompt anywhere: the cache holds raw rows, no carried state."""
    _, model = hf(**VARIANTS["kvshift-w3"])
    ids, mask = left_padded([11, 6], torch.Generator().manual_seed(9))
    want = model.generate(ids, attention_mask=mask, max_new_tokens=6, use_cache=False, **GREEDY)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6, prefill_chunk_size=4,
                         cache_implementation="static" if static else None, **GREEDY)
    assert torch.equal(got, want)


@pytest.mark.parametrize("later_mask", ["new-only", "none"])
def test_pads_of_a_prefill_are_remembered_on_the_cache(later_mask):
    """After a left-padded prefill on a transformers cache, a call whose mask covers only the new tokens (or
    that has none) still knows which cached slots are pads: the logits equal the full forward's."""
    lm, model = hf(dtype=torch.float64, **VARIANTS["kvshift-w1"])
    ids, mask = left_padded([3, 9], torch.Generator().manual_seed(4))
    more = torch.randint(1, 97, (2, 4), generator=torch.Generator().manual_seed(5))
    full_ids, full_mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones_like(more)], 1)
    with torch.no_grad():
        want = model(full_ids, attention_mask=full_mask).logits[:, -4:]
        cache = DynamicCache()
        model(ids, attention_mask=mask, cache=cache, use_cache=True)
        later = torch.ones_like(more) if later_mask == "new-only" else None
        got = model(more, attention_mask=later, cache=cache, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_logits_to_keep_is_honoured_and_generate_asks_for_it():
    """transformers' generate passes logits_to_keep=1 to a forward that names it (the prefill's logits at the
    last position only; Llama does the same), and assisted generation the draft's length + 1."""
    lm, model = hf()
    x = torch.randint(1, 97, (2, 10))
    assert model._supports_logits_to_keep()
    full = model(x).logits
    assert torch.allclose(model(x, logits_to_keep=4).logits, full[:, -4:], atol=1e-6)
    from kvshift.hf import KVShiftCache

    for cache in (DynamicCache(), StaticCache(config=model.config, max_cache_len=16), KVShiftCache()):
        got = model(x, past_key_values=cache, use_cache=True, logits_to_keep=2).logits
        assert got.shape[1] == 2 and torch.allclose(got, full[:, -2:], atol=1e-5), type(cache).__name__
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(x, labels=x, logits_to_keep=1)
    rows = []
    hook = model.model.output.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[1]))
    try:
        model.generate(x, max_new_tokens=3, **GREEDY)
        assert rows == [1, 1, 1]
        rows.clear()  # prompt lookup: each verification step scores the candidates + 1 positions, no more
        lookup = torch.cat([x[:1], x[:1, 2:8]], 1)
        model.generate(lookup, max_new_tokens=6, prompt_lookup_num_tokens=3, **GREEDY)
    finally:
        hook.remove()
    assert rows and all(1 <= r <= 4 for r in rows)  # never the whole 16-token prompt


@pytest.mark.skipif(not (__import__("os").environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()),
                    reason="the Triton decode kernel needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("mode", ["greedy", "beam"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_generate_through_the_decode_kernel_equals_uncached(static, mode, monkeypatch):
    """transformers' generate on its own caches with every decoding step on the flash-decoding kernel
    (DECODE_KERNEL "always"): the uncached tokens, for a left-padded batch, dynamic and static caches. Eager
    steps (disable_compile): on CUDA, generate compiles a static cache's step by default, and a compiled step
    reads through the shifted copy + SDPA instead (checked last, as a user calls it)."""
    import kvshift.layers.stateless_kernel as sk

    dev = "cpu" if __import__("os").environ.get("TRITON_INTERPRET") == "1" else "cuda"
    _, model = hf(**VARIANTS["kvshift-w3"])
    model = model.to(dev)
    ids, mask = (t.to(dev) for t in left_padded([7, 4], torch.Generator().manual_seed(3)))
    extra = dict(cache_implementation="static") if static else {}
    kw = dict(attention_mask=mask, max_new_tokens=6, **MODES[mode], pad_token_id=0, eos_token_id=None)
    want = model.generate(ids, use_cache=False, **kw)
    calls = []
    import kvshift.ops.shift.paged_decode as pd

    real = pd.dense_shift_decode  # counted where the kernel launches (kernel_decode may decline a layout)
    monkeypatch.setattr(pd, "dense_shift_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(sk, "DECODE_KERNEL", "always")
    kw.update(extra)
    got = model.generate(ids, disable_compile=True, **kw)
    assert torch.equal(got, want)
    assert calls
    if dev == "cuda" and static:  # as a user calls it: generate may compile the static step itself
        n = len(calls)
        assert torch.equal(model.generate(ids, **kw), want)
        compiled = "_compiled_call" in vars(model)
        # transformers compiles the static step of its sampling loop, which greedy decoding runs (the shifted
        # copy + SDPA in the graph, the kernel stays out); its beam search runs eager steps, on the kernel
        assert compiled == (mode == "greedy")
        assert (len(calls) == n) == compiled
