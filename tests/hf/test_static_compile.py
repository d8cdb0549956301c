"""KVShiftForCausalLM's decode step on a transformers StaticCache compiles as one graph (fullgraph, no graph
break) that serves every decode step (no recompile), with the eager path's logits; and transformers' own
generate(cache_implementation="static") compiles it that way and gives the uncached greedy tokens."""

import pytest
import torch
from transformers import CompileConfig, StaticCache

from .test_stateless_generate import GREEDY, VARIANTS, hf, left_padded

STEPS = 5  # decode steps after the prefill


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test counts its own graphs: dynamo's cache of the forward's code is shared by all models."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def counting_backend():
    """A torch.compile backend that runs the captured graph as is (eager: quick on CPU), and the list of the graphs
    it was given. A function, not an object: transformers deep-copies its compile_config, backend included."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend, graphs


def decode(model, step, ids, mask, max_len):
    """Prefill eagerly, then STEPS greedy decode steps through `step` (the forward, compiled or not) with the
    inputs generate() gives a static cache: one token and the 2-D mask padded to the allocation."""
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    B = ids.shape[0]
    with torch.no_grad():
        pad = model.create_masks_for_generate(attention_mask=mask, cache=cache, past_key_values=cache)
        logits = [model(ids, attention_mask=pad, cache=cache, use_cache=True).logits[:, -1]]
        for _ in range(STEPS):
            nxt = logits[-1].argmax(-1).view(B, 1)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            pad = model.create_masks_for_generate(attention_mask=mask, cache=cache, past_key_values=cache)
            assert pad.shape == (B, max_len)  # the same shape at every step
            logits.append(step(input_ids=nxt, attention_mask=pad, cache=cache, use_cache=True).logits[:, -1])
    return ids, torch.stack(logits, 1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_static_decode_step_is_one_graph_with_eager_logits(variant):
    lm, model = hf(dtype=torch.float64, **VARIANTS[variant])
    ids, mask = left_padded([7, 4], torch.Generator().manual_seed(12))
    want_ids, want = decode(model, model, ids, mask, 16)
    backend, graphs = counting_backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got_ids, got = decode(model, compiled, ids, mask, 16)
    assert len(graphs) == 1  # one graph for every decode step
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    for i, n in enumerate([7, 4]):  # and the uncached forward of each row alone
        alone = lm(want_ids[i:i + 1, 7 - n:])[:, n - 1:]
        torch.testing.assert_close(got[i:i + 1], alone, rtol=0, atol=1e-6)


def compile_config(backend) -> CompileConfig:
    cfg = CompileConfig(fullgraph=True, dynamic=False, backend=backend, mode="default")
    cfg._compile_all_devices = True  # transformers' switch to compile on CPU too (it compiles on accelerators only)
    return cfg


@pytest.mark.parametrize("variant", ["kvshift-w1", "kvshift-w3", "gate-w2", "alibi", "learned-gelu"])
def test_generate_compiles_the_static_decode_step(variant):
    """generate(cache_implementation="static") with transformers' own compile of the decode step (its
    compile_config, fullgraph): one graph for every step and call, the uncached greedy tokens of a left-padded
    batch."""
    _, model = hf(**VARIANTS[variant])
    ids, mask = left_padded([8, 5, 3], torch.Generator().manual_seed(13))
    want = model.generate(ids, attention_mask=mask, max_new_tokens=7, use_cache=False, **GREEDY)
    backend, graphs = counting_backend()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):  # the second call, on a new StaticCache of the same size, reuses the graph
            got = model.generate(ids, attention_mask=mask, max_new_tokens=7, cache_implementation="static",
                                 compile_config=compile_config(backend), **GREEDY)
            assert torch.equal(got, want)
    assert len(graphs) == 1  # generate compiled the decode step (the prefill is eager) and traced it once


def test_generate_compiles_a_chunked_prefill():
    """With prefill_chunk_size, transformers compiles the prefill's chunks too: one graph per chunk length and one
    for the decode step, all reused by the next call; the uncached greedy tokens."""
    _, model = hf(**VARIANTS["kvshift-w3"])
    ids, mask = left_padded([11, 6], torch.Generator().manual_seed(9))
    want = model.generate(ids, attention_mask=mask, max_new_tokens=6, use_cache=False, **GREEDY)
    backend, graphs = counting_backend()
    for _ in range(2):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, prefill_chunk_size=4,
                             cache_implementation="static", compile_config=compile_config(backend), **GREEDY)
        assert torch.equal(got, want)
    assert len(graphs) == 3  # chunks of 4 and of 3 tokens, the decode step


@pytest.mark.parametrize("later_mask", ["new-only", "none", "padded"])
def test_static_cache_remembers_pads_and_checks_the_mask(later_mask):
    """On a StaticCache the pads of a left-padded prefill are remembered in the cache's slot buffer: a later call
    with a mask of its new tokens only, none, or the mask padded to the allocation, gives the full forward's
    logits; a pad after a real token is refused before anything is written."""
    lm, model = hf(dtype=torch.float64, **VARIANTS["kvshift-w3"])
    ids, mask = left_padded([3, 9], torch.Generator().manual_seed(4))
    more = torch.randint(1, 97, (2, 4), generator=torch.Generator().manual_seed(5))
    full_ids, full_mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones_like(more)], 1)
    cache = StaticCache(config=model.config, max_cache_len=20)
    with torch.no_grad():
        want = model(full_ids, attention_mask=full_mask).logits[:, -4:]
        model(ids, attention_mask=mask, cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="left-padded"):
            model(more, attention_mask=torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]]), cache=cache, use_cache=True)
        assert int(cache.get_seq_length()) == ids.shape[1]
        later = {"new-only": torch.ones_like(more), "none": None,
                 "padded": model.create_masks_for_generate(attention_mask=full_mask, cache=cache)}[later_mask]
        got = model(more, attention_mask=later, cache=cache, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
