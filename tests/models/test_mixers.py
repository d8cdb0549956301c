"""The short causal mixers (ModelConfig.mixer: dconv, canon, keyoffset, smear) beside an attention kind:
cached decoding == full forward under random chunkings, left padding, packing, GQA, beam reordering of
their cache state, compile, gradients, init, parameter counts and config checks. fp64 for exactness."""

import pytest
import torch

from kvshift import LM, ModelConfig
from kvshift.layers.mixers import ChannelConv, KeyOffset, Smear, keyoffset_channels

MIXERS = ["dconv", "canon", "keyoffset", "smear"]
CASES = [(m, "vanilla") for m in MIXERS] + [(m, "kvshift") for m in MIXERS]
IDS = [f"{m}-{a}" for m, a in CASES]
TOL = 1e-10  # fp64


def perturb(model: LM, seed: int = 0) -> LM:
    """Move mixer parameters (and shift coefficients) off their init, so every tap and gate matters
    (Canon's zero init and smear's zero scale are the identity: they would hide a broken state)."""
    g = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mixer" in name or "shift_" in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
            if name.endswith("embed_mixer.scale"):
                p.fill_(0.8)
    return model


def make(mixer, attention="vanilla", seed=0, dtype=torch.float64, **kw) -> LM:
    cfg = ModelConfig.from_name("debug", mixer=mixer, attention=attention, **kw)
    return perturb(LM(cfg, seed=seed).to(dtype).eval(), seed)


def chunks_of(T, g):
    """A prefill, maybe a continuation chunk, then short chunks and single tokens ([3, 1, 5, 1, ...])."""
    out, s = [], 0
    while s < T:
        n = int(torch.randint(1, 6, (1,), generator=g)) if s < T // 2 else 1 + int(torch.rand(1, generator=g) < 0.3)
        out.append((s, min(T, s + n)))
        s += n
    return out


@pytest.mark.parametrize("mixer,attention", CASES, ids=IDS)
def test_cached_decoding_equals_full_forward(mixer, attention):
    g = torch.Generator().manual_seed(MIXERS.index(mixer))
    model = make(mixer, attention)
    x = torch.randint(0, 97, (3, 21), generator=g)
    with torch.no_grad():
        full = model(x)
        for _ in range(2):
            cache = model.new_cache(3, 32)
            out = torch.cat([model(x[:, s:e], cache=cache) for s, e in chunks_of(21, g)], 1)
            assert (out - full).abs().max().item() <= TOL
        assert cache.mixer, "the mixer keeps its history in the cache"


@pytest.mark.parametrize("options", [{"canon_positions": p} for p in "ABCD"] + [{"canon_positions": "D", "mlp": "gelu"},
                                     {"keyoffset_layers": (1,)}, {"position": "learned"}],
                         ids=["A", "B", "C", "D", "D-gelu", "keyoffset-layer1", "learned"])
def test_cached_decoding_per_option(options):
    mixer = "keyoffset" if "keyoffset_layers" in options else "smear" if "position" in options else "canon"
    g = torch.Generator().manual_seed(3)
    model = make(mixer, "kvshift", **options)
    x = torch.randint(0, 97, (2, 15), generator=g)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 16)
        out = torch.cat([model(x[:, s:e], cache=cache) for s, e in [(0, 3), (3, 4), (4, 9)] +
                         [(i, i + 1) for i in range(9, 15)]], 1)
    assert (out - full).abs().max().item() <= TOL


@pytest.mark.parametrize("mixer,attention", CASES, ids=IDS)
def test_left_padded_batch_equals_rows_alone(mixer, attention):
    g = torch.Generator().manual_seed(7)
    model = make(mixer, attention)
    lengths = [12, 7, 1]
    rows = [torch.randint(1, 97, (n,), generator=g) for n in lengths]
    T = max(lengths)
    ids = torch.randint(1, 97, (3, T), generator=g)  # pads hold arbitrary tokens: they must not matter
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    cont = torch.randint(1, 97, (3, 5), generator=g)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            assert (batched[i, T - len(r):] - model(r[None])[0]).abs().max().item() <= TOL
        cache = model.new_cache(3, T + 5)  # cached: the padded prompts, then one token at a time
        model(ids, attention_mask=mask, cache=cache)
        steps = torch.cat([model(cont[:, i:i + 1], cache=cache) for i in range(5)], 1)
        for i, r in enumerate(rows):
            alone = model(torch.cat([r, cont[i]])[None])[0, -5:]
            assert (steps[i] - alone).abs().max().item() <= TOL


@pytest.mark.parametrize("varlen", [False, True], ids=["masked", "varlen"])
@pytest.mark.parametrize("mixer,attention", CASES, ids=IDS)
def test_packed_equals_separate_documents(mixer, attention, varlen, monkeypatch):
    monkeypatch.setattr("kvshift.layers.attention.VARLEN_OFF_CUDA", varlen)  # the CUDA path's exact CPU math
    g = torch.Generator().manual_seed(11)
    model = make(mixer, attention)
    lengths = [5, 1, 9, 3]
    docs = [torch.randint(0, 97, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    with torch.no_grad():
        sep = torch.cat([model(d[None]) for d in docs], 1)
        assert (model(torch.cat(docs)[None], cu_seqlens=cu) - sep).abs().max().item() <= TOL
        pos = torch.stack([torch.cat([torch.arange(n) for n in lengths]),
                           torch.cat([torch.arange(n) for n in lengths[::-1]])])
        out = model(torch.stack([torch.cat(docs), torch.cat(docs[::-1])]), position_ids=pos)
        sep2 = torch.cat([model(d[None]) for d in docs[::-1]], 1)
        joined = model(torch.cat(docs)[None])
    assert (out[0] - sep[0]).abs().max().item() <= TOL
    assert (out[1] - sep2[0]).abs().max().item() <= TOL
    # the packing matters: without the reset a document's first token sees the previous document
    assert (joined[0, 5:] - sep[0, 5:]).abs().max().item() > 1e-3


def _mha_copy(gqa: LM) -> LM:
    """The MHA model equal to a GQA one: every k/v head (weights, shift coefficients, mixer taps) repeated."""
    cfg = gqa.config
    rep, hd = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    mha = LM(cfg.replace(n_kv_heads=cfg.n_heads), seed=None).to(torch.float64).eval()
    sd = {}
    for name, t in gqa.state_dict().items():
        kv = name.endswith(("wk.weight", "wv.weight")) or (".attention.qkv_mixer." in name and name[-1] in "kv")
        if kv:
            t = t.view(cfg.n_kv_heads, hd, *t.shape[1:]).repeat_interleave(rep, 0).flatten(0, 1)
        elif "shift_" in name:
            t = t.repeat_interleave(rep, 0)
        sd[name] = t
    mha.load_state_dict(sd)
    return mha


@pytest.mark.parametrize("mixer,attention", CASES, ids=IDS)
def test_gqa_equals_mha_with_repeated_kv_heads(mixer, attention):
    model = make(mixer, attention)
    assert model.config.n_kv_heads < model.config.n_heads
    x = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(x) - _mha_copy(model)(x)).abs().max().item() <= TOL


@pytest.mark.parametrize("mixer", MIXERS)
def test_beam_reorder_reorders_the_mixer_state(mixer):
    model = make(mixer, "kvshift")
    x = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(4))
    index = torch.tensor([2, 0, 0])
    with torch.no_grad():
        cache = model.new_cache(3, 16)
        model(x[:, :8], cache=cache)
        cache.reorder(index)
        out = torch.cat([model(x[index, i:i + 1], cache=cache) for i in range(8, 12)], 1)
        full = model(x[index])[:, 8:]
    assert (out - full).abs().max().item() <= TOL


@pytest.mark.parametrize("mixer", MIXERS)
def test_compile_fullgraph_matches_eager_with_gradients(mixer):
    # the modules' code objects are shared by every model the suite compiles: start from a clean dynamo cache, or
    # the suite's earlier compilations count against this one's recompile limit (fullgraph=True fails on it)
    torch._dynamo.reset()
    model = make(mixer, "kvshift", dtype=torch.float32).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(6), torch.arange(10)]).expand(2, 16)  # packed documents, fullgraph too
    for kw in ({}, {"position_ids": pos}):
        ref = model(x[:, :-1], **kw)
        got = compiled(x[:, :-1], **kw)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    loss = torch.nn.functional.cross_entropy(got.reshape(-1, 97), x[:, 1:].reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        if "mixer" in name:
            assert p.grad is not None and p.grad.abs().max() > 0, name


@pytest.mark.parametrize("mixer", MIXERS)
def test_gradients_reach_the_mixer_from_its_init_and_no_decay(mixer):
    """From the default init: every conv tap and smear's scale get a gradient; mixer parameters are in
    the no-weight-decay group."""
    model = LM(ModelConfig.from_name("debug", mixer=mixer), seed=0)
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, 97), x[:, 1:].reshape(-1))
    loss.backward()
    names = [n for n, _ in model.named_parameters() if "mixer" in n]
    assert bool(names) == (mixer != "keyoffset")
    for name, p in model.named_parameters():
        if "mixer" in name and not name.endswith("embed_mixer.gate"):  # the gate learns once scale != 0
            assert p.grad.abs().max() > 0, name
    decay, no_decay = model.param_groups(0.1)
    mixer_ids = {id(p) for n, p in model.named_parameters() if "mixer" in n}
    assert mixer_ids <= {id(p) for p in no_decay["params"]}
    assert not mixer_ids & {id(p) for p in decay["params"]}


@pytest.mark.parametrize("mixer", ["dconv", "canon", "smear"])
def test_init_is_the_model_without_the_mixer(mixer):
    """dconv's identity, Canon's zero residual taps and smear's zero scale: the model starts as the one
    without a mixer, and every shared weight is drawn identically."""
    base = LM(ModelConfig.from_name("debug", attention="kvshift"), seed=4).double().eval()
    model = LM(ModelConfig.from_name("debug", attention="kvshift", mixer=mixer), seed=4).double().eval()
    sd = model.state_dict()
    for name, t in base.state_dict().items():
        assert torch.equal(sd[name], t), name
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert (model(x) - base(x)).abs().max().item() == 0
        perturb(model)
        assert (model(x) - base(x)).abs().max().item() > 1e-3


def test_keyoffset_takes_the_slow_rope_channels_of_the_previous_key():
    assert keyoffset_channels(12).nonzero().flatten().tolist() == [3, 4, 5, 9, 10, 11]
    assert keyoffset_channels(64).nonzero().flatten().tolist() == list(range(16, 32)) + list(range(48, 64))
    model = make("keyoffset", "vanilla", keyoffset_layers=[1], position="none")  # keys reach attention as is
    assert model.config.keyoffset_layers == (1,)
    assert model.layers[0].attention.qkv_mixer is None
    assert isinstance(model.layers[1].attention.qkv_mixer, KeyOffset)
    att = model.layers[1].attention
    raw, seen = [], []
    h = att.wk.register_forward_hook(lambda m, a, out: raw.append(out.view(2, 6, 2, 12)))
    orig = att._attend
    att._attend = lambda q, k, v, ctx, B, T: (seen.append(k), orig(q, k, v, ctx, B, T))[1]
    cu = torch.tensor([0, 2, 6, 12], dtype=torch.int32)  # the second document starts at token 2
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 6)))
        model(torch.randint(0, 97, (1, 12)), cu_seqlens=cu)
    h.remove()
    del att._attend
    m = keyoffset_channels(12)
    before = torch.cat([torch.zeros_like(raw[0][:, :1]), raw[0][:, :-1]], 1)
    expect = torch.where(m, before, raw[0])
    assert (seen[0] - expect).abs().max().item() == 0
    k = seen[1].view(12, 2, 12)  # packed: each document's first token takes zeros, not the last document's
    flat = raw[1].view(12, 2, 12)
    assert (k[2][:, m] == 0).all() and (k[6][:, m] == 0).all() and torch.equal(k[3][:, m], flat[2][:, m])
    assert torch.equal(k[2][:, ~m], flat[2][:, ~m])


def test_parameter_counts():
    for mixer in ["none"] + MIXERS:
        for options in [{}, {"mlp": "gelu"}, {"canon_positions": "BD"}, {"canon_positions": "AC", "mlp": "gelu"},
                        {"tie_embeddings": True, "position": "learned"}]:
            m = LM(ModelConfig.from_name("debug", mixer=mixer, **options), seed=0)
            assert m.num_params() == m.config.non_embedding_params(), (mixer, options)
    m = LM(ModelConfig.from_name("debug", mixer="canon", canon_positions="DB"), seed=0)
    assert m.config.canon_positions == "BD"
    assert [type(m.layers[0].mixer_a), type(m.layers[0].attention.qkv_mixer)] == [type(None), ChannelConv]
    assert isinstance(LM(ModelConfig.from_name("debug", mixer="smear")).embed_mixer, Smear)


BAD = {
    "mixer": ({"mixer": "conv"}, r"mixer must be one of \('none', 'dconv', 'canon', 'keyoffset', 'smear'\)"),
    "canon-empty": ({"canon_positions": ""}, "canon_positions must be a non-empty subset"),
    "canon-letter": ({"canon_positions": "AE"}, "canon_positions"),
    "canon-repeat": ({"canon_positions": "AA"}, "canon_positions"),
    "canon-type": ({"canon_positions": ["A"]}, "canon_positions"),
    "layers-range": ({"keyoffset_layers": (0, 2)}, r"keyoffset_layers must be 'all' or .*n_layers=2"),
    "layers-empty": ({"keyoffset_layers": []}, "keyoffset_layers"),
    "layers-str": ({"keyoffset_layers": "first"}, "keyoffset_layers"),
    "layers-bool": ({"keyoffset_layers": [True]}, "keyoffset_layers"),
    "keyoffset-head-dim": ({"mixer": "keyoffset", "dim": 40}, "mixer='keyoffset' needs a head_dim divisible by 4"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_mixer_config_names_the_field(case):
    kw, msg = BAD[case]
    with pytest.raises(ValueError, match=msg):
        ModelConfig.from_name("debug", **kw)


def test_config_round_trips_through_a_dict():
    cfg = ModelConfig.from_name("debug", mixer="keyoffset", keyoffset_layers=[1, 0], canon_positions="CA")
    assert cfg.keyoffset_layers == (0, 1) and cfg.canon_positions == "AC"
    d = cfg.to_dict()
    d["keyoffset_layers"] = list(d["keyoffset_layers"])  # as JSON/TOML give it back
    assert ModelConfig.from_dict(d) == cfg


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_every_canon_position_acts_where_documented(mlp):
    """Each position's taps change the logits; A mixes the normed attention input, B q/k/v, C the MLP
    block's (dim-wide) input, D the MLP's (ffn_dim-wide) pre-activations: 2 of them for SwiGLU, 1 for GELU."""
    model = LM(ModelConfig.from_name("debug", mixer="canon", mlp=mlp), seed=0).double().eval()
    block, cfg = model.layers[0], model.config
    x = torch.randint(0, 97, (1, 7))
    mods = {"A": block.mixer_a, "B": block.attention.qkv_mixer, "C": block.mixer_c, "D": block.feed_forward.mixer}
    widths = {"A": [cfg.dim], "B": [cfg.dim, cfg.dim // 2, cfg.dim // 2], "C": [cfg.dim],
              "D": [cfg.ffn_dim] * (2 if mlp == "swiglu" else 1)}
    with torch.no_grad():
        base = model(x)
        for pos, mod in mods.items():
            seen = []
            hook = mod.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[1:]))
            for p in mod.parameters():
                p[:, 1] = 0.5  # h_t <- h_t + 0.5 h_{t-1}
            assert (model(x) - base).abs().max().item() > 1e-3, pos
            hook.remove()
            for p in mod.parameters():
                p.zero_()
            assert [t.shape[2] * t.shape[3] if t.dim() == 4 else t.shape[-1] for t in seen[0]] == widths[pos], pos
            if pos == "A":
                torch.testing.assert_close(seen[0][0], block.attention_norm(model.tok_embeddings(x)))


def test_smear_is_the_gated_previous_embedding():
    """The first block's input is e_t + lambda * sigmoid(g . e_t) * e_{t-1}, with e_{-1} = 0 at a row's
    (and, packed, a document's) start."""
    model = make("smear")
    sm = model.embed_mixer
    x = torch.randint(0, 97, (2, 8))
    seen = []
    hook = model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(x)
        model(x[:1], cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32))
    hook.remove()
    e = model.tok_embeddings(x).detach()
    prev = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], 1)
    expect = e + sm.scale * torch.sigmoid(e @ sm.gate).unsqueeze(-1) * prev
    torch.testing.assert_close(seen[0], expect.detach(), rtol=0, atol=1e-12)
    prev[0, 3] = 0  # the second document's first token
    expect = e + sm.scale * torch.sigmoid(e @ sm.gate).unsqueeze(-1) * prev
    torch.testing.assert_close(seen[1], expect[:1].detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mixer,window,residual", [("dconv", 2, False), ("canon", 3, True)])
def test_qkv_conv_is_the_documented_depthwise_conv(mixer, window, residual):
    """dconv: y_t = sum_{j<=2} w_j * x_{t-j}; Canon B: y_t = x_t + sum_{j<=3} w_j * x_{t-j}; per channel."""
    model = make(mixer)
    conv = model.layers[1].attention.qkv_mixer
    seen = []
    hook = conv.register_forward_hook(lambda m, args, out: seen.append((args[1:], out)))
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 9)))
    hook.remove()
    (ins, outs), = seen
    for name, x, y in zip("qkv", ins, outs):
        w = getattr(conv, name).view(x.shape[2], x.shape[3], window + 1)
        expect = x.clone() if residual else torch.zeros_like(x)
        for j in range(window + 1):
            xj = torch.cat([torch.zeros_like(x[:, :j]), x[:, :x.shape[1] - j]], 1)
            expect = expect + w[..., j] * xj
        torch.testing.assert_close(y, expect, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mixer", MIXERS)
def test_triton_mix_matches_naive_in_the_model(mixer, monkeypatch):
    """shift_impl="triton" (the interpreter on CPU) runs the mixers on the fused causal-mix kernels: the
    naive model's logits (plain, packed, cached with history) and mixer gradients."""
    pytest.importorskip("triton")
    from kvshift.ops.shift import triton_available
    if not triton_available():
        pytest.skip("triton kernels unavailable (no CUDA and TRITON_INTERPRET unset)")
    import kvshift.ops.mix.triton as tm
    calls, mix = [], tm.causal_mix
    monkeypatch.setattr(tm, "causal_mix", lambda *a, **k: (calls.append(1), mix(*a, **k))[1])
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the real kernels on a GPU, the interpreter here
    ref = make(mixer, "vanilla", dtype=torch.float32, shift_impl="naive").to(dev)
    fused = LM(ref.config.replace(shift_impl="triton"), seed=None).to(dev).eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0)).to(dev)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=dev)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused(x[:1], cu_seqlens=cu), ref(x[:1], cu_seqlens=cu), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        cache = fused.new_cache(2, 9)
        out = torch.cat([fused(x[:, :5], cache=cache), fused(x[:, 5:7], cache=cache), fused(x[:, 7:], cache=cache)], 1)
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
    for m in (ref, fused):
        m(x).square().mean().backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if "mixer" in n}
    for n, p in fused.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)
    assert calls, "the fused kernels ran"
