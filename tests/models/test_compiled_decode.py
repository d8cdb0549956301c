"""The compiled static-shape decode step of `LM.generate(compile=...)` (kvshift.models.static_decode): its
logits equal the eager cached decode's (every attention kind, position scheme, window, left padding, GQA/MHA,
the fused Triton decode kernel too), the compiled generate gives the eager generate's tokens (greedy,
seeded sampling, eos), dynamo captures the step in one graph, the state is reused across calls, and what it
does not support is refused by name.

torch.compile on a CPU is slow: the token tests compile with backend "aot_eager" (dynamo's capture and
AOT functionalisation of the in-place cache writes, no code generation); one test runs inductor itself."""

import pytest
import torch

from kvshift import LM, ModelConfig
from kvshift.layers.attention import SHIFT_KINDS
from kvshift.models.static_decode import STATIC_BUCKET, static_decoder, static_step

TOL = 1e-4  # fp32 max |Δlogit|, static step vs eager cached decode
FAST = {"backend": "aot_eager"}


def make(kind="kvshift", window=1, position="rope", n_layers=2, **kw):
    cfg = ModelConfig.from_name("debug", attention=kind, shift_window=window, position=position, n_layers=n_layers,
                                **kw)
    model = LM(cfg, seed=0).eval()
    with torch.no_grad():  # move coefficients off the paper init so every tap matters
        for layer in model.layers:
            for p in layer.attention.parameters():
                if p.dim() == 2 and p.shape[0] == cfg.n_kv_heads and p.shape[1] <= 4:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    return model


def padded_batch(lengths, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (len(lengths), T), generator=g)
    mask = (torch.arange(T) >= torch.tensor([[T - n] for n in lengths])).long()
    return ids * mask, mask


@pytest.mark.parametrize("kind, window, position, extra", [
    ("vanilla", 1, "rope", {}), ("kvshift", 1, "rope", {}), ("kvshift", 3, "rope", {"n_kv_heads": 4}),
    ("kshift", 2, "alibi", {}), ("vshift", 1, "learned", {}), ("kvshift_gate", 2, "none", {}),
    ("kvshift_clamp", 1, "rope", {"shift_impl": "triton"}),  # eager: the fused Triton decode kernel
], ids=["vanilla", "kvshift", "kvshift-w3-mha", "kshift-alibi", "vshift-learned", "gate-none", "clamp-triton"])
@pytest.mark.parametrize("gqa_heads", [False, True], ids=["gqa-rows", "gqa-heads"])
def test_static_step_logits_equal_eager_cached_decode(kind, window, position, extra, gqa_heads):
    """The uncompiled step (the function generate compiles) against the eager cached forward, fp32, left
    padding; a few steps, each fed the same token. Both GQA layouts: a KV group's query heads as query rows,
    and one query row per head with enable_gqa (what the decoder picks where cuDNN takes it)."""
    model = make(kind, window, position, **extra)
    ids, mask = padded_batch([9, 4, 1], 9)
    eager = model.new_cache(3, 16)
    dec = static_decoder(model, 3, 16, ids.device, FAST)
    assert dec.cache.valid.shape == (3, STATIC_BUCKET)
    with torch.no_grad():
        ref = model(ids, cache=eager, attention_mask=mask)[:, -1]
        got = model(ids, cache=dec.cache, attention_mask=mask)[:, -1]
        dec.start(15)
        g = torch.Generator().manual_seed(2)
        for _ in range(4):
            assert (got - ref).abs().max().item() <= TOL
            tok = torch.randint(1, 97, (3,), generator=g)
            ref = model(tok.view(3, 1), cache=eager)[:, -1]
            got = static_step(model, tok, dec.slot, dec.cache, position == "rope", gqa_heads)
        assert (got - ref).abs().max().item() <= TOL
    assert int(dec.slot) == eager.length and torch.equal(dec.cache.seen, eager.seen)
    assert torch.equal(dec.cache.valid[:, :eager.length], eager.valid[:, :eager.length])
    # RoPE models that shift keys keep a copy of the raw key window rolled by half the head dim, in step with it
    assert (dec.cache.raw_k_rolled is not None) == (position == "rope" and SHIFT_KINDS[kind][0])
    for rolled, raw in zip(dec.cache.raw_k_rolled or (), dec.cache.raw_k):
        assert torch.equal(rolled, torch.roll(raw, raw.shape[-1] // 2, dims=-1))


@pytest.mark.parametrize("kind", ["vanilla", "kvshift", "kshift"])
def test_compiled_generate_equals_eager_greedy(kind):
    model = make(kind)
    ids, mask = padded_batch([7, 3], 7, seed=3)
    want = model.generate(ids, 6, temperature=0, attention_mask=mask)
    assert torch.equal(model.generate(ids, 6, temperature=0, attention_mask=mask, compile=FAST), want)
    plain = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    assert torch.equal(model.generate(plain, 6, temperature=0, compile=FAST), model.generate(plain, 6, temperature=0))


def test_gqa_heads_layout_is_asked_of_cudnn_once_and_reaches_the_step(monkeypatch):
    """The decoder asks `gqa_heads_ok` once (no on a CPU or an MHA model, where there is nothing to pick) and
    compiles the step with the answer: with the one-row-per-head layout forced, compiled generate still
    gives the eager tokens."""
    import kvshift.models.static_decode as sd

    gqa, mha = make("kvshift"), make("kvshift", n_kv_heads=4)
    assert not sd.gqa_heads_ok(gqa, gqa.new_cache(2, 8)) and not sd.gqa_heads_ok(mha, mha.new_cache(2, 8))
    if torch.cuda.is_available():  # the dispatcher's own choice for the call, on a bf16 cache
        from torch.nn.attention import SDPBackend

        cache = gqa.new_cache(2, 8, dtype=torch.bfloat16, device="cuda")
        q = torch.zeros(2, 4, 1, 12, dtype=torch.bfloat16, device="cuda")
        k = cache.k[0].transpose(1, 2)
        choice = torch._fused_sdp_choice(q, k, k, cache.valid.view(2, 1, 1, -1), 0.0, False, enable_gqa=True)
        assert sd.gqa_heads_ok(gqa, cache) == (choice == int(SDPBackend.CUDNN_ATTENTION))
    ids, mask = padded_batch([7, 3], 7, seed=3)
    want = gqa.generate(ids, 6, temperature=0, attention_mask=mask)
    asked = []
    monkeypatch.setattr(sd, "gqa_heads_ok", lambda model, cache: asked.append(cache) or True)
    seen = []
    real_step = sd.static_step
    monkeypatch.setattr(sd, "static_step", lambda *a: seen.append(a[-1]) or real_step(*a))
    gqa.release_static_decode()
    assert torch.equal(gqa.generate(ids, 6, temperature=0, attention_mask=mask, compile=FAST), want)
    assert len(asked) == 1 and gqa._static_decoder.gqa_heads is True and seen and all(seen)


def test_many_decoders_in_one_process_do_not_reach_the_recompile_limit():
    """Every batch size is a new decoder with its own compiled step: more of them than dynamo's recompile limit
    (8 per code object) still decode, each to the eager tokens."""
    import torch._dynamo.config as dc

    model = make("kvshift")
    prompts = torch.randint(1, 97, (12, 4), generator=torch.Generator().manual_seed(6))
    limit = getattr(dc, "recompile_limit", None) or dc.cache_size_limit  # the older name
    for b in range(1, limit + 3):
        ids = prompts[:b]
        assert torch.equal(model.generate(ids, 2, temperature=0, compile=FAST), model.generate(ids, 2, temperature=0))


def test_a_decoder_of_a_shape_seen_before_reuses_its_compiled_step():
    """Alternating batch sizes make a new decoder each time; the second decoder of a shape finds the first
    one's compiled graph (one compile per shape, counted by dynamo), and so does another model of the same
    config, decoding with its own weights (they are the graph's inputs, not its constants)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # graphs earlier tests compiled for these shapes would be found too
    counters.clear()
    model = make("kvshift")
    prompts = torch.randint(1, 97, (3, 4), generator=torch.Generator().manual_seed(7))
    for b in (2, 3, 2, 3):
        model.generate(prompts[:b], 2, temperature=0, compile=FAST)
    assert counters["stats"]["unique_graphs"] == 2
    other = LM(model.config, seed=1).eval()
    want = other.generate(prompts[:2], 4, temperature=0)
    assert not torch.equal(want, model.generate(prompts[:2], 4, temperature=0))
    assert torch.equal(other.generate(prompts[:2], 4, temperature=0, compile=FAST), want)
    assert counters["stats"]["unique_graphs"] == 2


def test_compiled_generate_equals_eager_sampling_and_eos():
    model = make("kvshift", 2)
    ids, mask = padded_batch([6, 2, 4], 6, seed=5)
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, attention_mask=mask)
    want = model.generate(ids, 7, generator=torch.Generator().manual_seed(0), **kw)
    got = model.generate(ids, 7, generator=torch.Generator().manual_seed(0), compile=FAST, **kw)
    assert torch.equal(got, want)
    greedy = model.generate(ids, 7, temperature=0, attention_mask=mask)
    eos = int(greedy[0, 7])  # row 0 stops at its second new token, the others run on (or stop too)
    want = model.generate(ids, 7, temperature=0, attention_mask=mask, eos_token_id=eos)
    got = model.generate(ids, 7, temperature=0, attention_mask=mask, eos_token_id=eos, compile=FAST)
    assert torch.equal(got, want) and (got[0, 7:] == eos).all()


def test_step_is_one_graph_and_state_is_reused():
    """dynamo captures the whole step (no graph break: no host sync, no data-dependent branch); generate
    calls of one batch size whose lengths share an allocation bucket reuse the buffers and the graph."""
    model = make("kvshift", 1)
    dec = static_decoder(model, 2, 10, torch.device("cpu"), FAST)
    model(torch.randint(1, 97, (2, 4)), cache=dec.cache)
    dec.start(9)
    ex = torch._dynamo.explain(static_step)(model, torch.tensor([3, 5]), dec.slot, dec.cache, True)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters["stats"]
    ids = torch.randint(1, 97, (2, 5))
    model.generate(ids, 4, temperature=0, compile=FAST)
    dec, graphs = model._static_decoder, counters["unique_graphs"]
    buffers = [t.data_ptr() for t in (*dec.cache.k, *dec.cache.raw_k, dec.cache.valid)]
    out = model.generate(ids[:, :3], 9, temperature=0, compile=FAST)  # another length, same bucket
    assert counters["unique_graphs"] == graphs and model._static_decoder is dec
    assert [t.data_ptr() for t in (*dec.cache.k, *dec.cache.raw_k, dec.cache.valid)] == buffers
    assert torch.equal(out, model.generate(ids[:, :3], 9, temperature=0))
    model.release_static_decode()
    assert "_static_decoder" not in vars(model)


def test_inductor_compiled_generate_equals_eager():
    """compile=True itself (inductor on a CPU), left padding, GQA, KV shift: the tokens, then the compiled
    step's logits (the same graph: same batch and bucket) against the eager cached decode."""
    model = make("kvshift", 1, n_layers=1)
    ids, mask = padded_batch([5, 2], 5, seed=6)
    want = model.generate(ids, 4, temperature=0, attention_mask=mask)
    assert torch.equal(model.generate(ids, 4, temperature=0, attention_mask=mask, compile=True), want)
    dec, eager = static_decoder(model, 2, 9, ids.device, True), model.new_cache(2, 9)
    assert dec is model._static_decoder
    with torch.no_grad():
        model(ids, cache=dec.cache, attention_mask=mask)
        model(ids, cache=eager, attention_mask=mask)
        step = dec.start(8)
        for tok in torch.randint(1, 97, (3, 2), generator=torch.Generator().manual_seed(7)):
            ref = model(tok.view(2, 1), cache=eager)[:, -1]
            assert (step(tok) - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("case, kw, what", [
    ("mixer", {"mixer": "dconv"}, "mixer='dconv'"),
    ("stateless", {"stateless": True}, "stateless=True"),
    ("compile-value", {"compile": "yes"}, "compile must be"),
    ("graph-breaks", {"compile": {"fullgraph": False}}, "fullgraph=True"),
    ("learned-overflow", {"position": "learned"}, "position='learned'"),
])
def test_unsupported_is_refused_by_name(case, kw, what):
    cfg_kw = {k: kw.pop(k) for k in ("mixer", "position") if k in kw}
    model = make("kvshift", 1, **cfg_kw)
    ids = torch.randint(1, 97, (1, 120 if case == "learned-overflow" else 4))
    with pytest.raises(ValueError, match=what):
        model.generate(ids, 10, temperature=0, **{"compile": FAST, **kw})


def test_inference_mode_calls_get_their_own_buffers():
    """Buffers made under torch.inference_mode cannot be updated outside it: alternating is not an error."""
    model = make("vanilla", n_layers=1)
    ids = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(8))
    want = model.generate(ids, 4, temperature=0)
    with torch.inference_mode():
        assert torch.equal(model.generate(ids, 4, temperature=0, compile=FAST), want)
    assert torch.equal(model.generate(ids, 4, temperature=0, compile=FAST), want)


def test_a_copy_decodes_with_its_own_weights_and_pickles():
    """The compiled decode's state belongs to its model: a deep copy (then trained apart) must not decode with
    the original's step, and a model that decoded compiled still pickles."""
    import copy
    import io

    model = make("kvshift", 2)
    ids = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(8))
    model.generate(ids, 4, temperature=0, compile=FAST)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.5)
    assert torch.equal(twin.generate(ids, 6, temperature=0, compile=FAST), twin.generate(ids, 6, temperature=0))
    assert torch.equal(model.generate(ids, 6, temperature=0, compile=FAST), model.generate(ids, 6, temperature=0))
    torch.save(model, io.BytesIO())
