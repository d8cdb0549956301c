"""Model-level invariants: cached decoding == full forward, packed == separate, padded == alone,
identity shift == vanilla, compile, training, and input checks."""

import pytest
import torch

import kvshift
from kvshift import LM, ModelConfig

KINDS = list(kvshift.ATTENTION_KINDS)
TOL = 1e-4  # fp32 max |Δlogit| for cached vs full


def make(kind="kvshift", window=1, position="rope", seed=0, **kw):
    cfg = ModelConfig.from_name("debug", attention=kind, shift_window=window, position=position, **kw)
    model = LM(cfg, seed=seed).eval()
    with torch.no_grad():  # move coefficients off the paper init so every tap matters
        for layer in model.layers:
            for p in layer.attention.parameters():
                if p.dim() == 2 and p.shape[0] == cfg.n_kv_heads and p.shape[1] <= 4:
                    p.add_(torch.randn(p.shape) * 0.3)
    return model


def chunks_of(T, g):
    """Random chunking: a prefill, maybe a continuation chunk, then single tokens."""
    a = int(torch.randint(1, T - 2, (1,), generator=g))
    b = int(torch.randint(a + 1, T, (1,), generator=g))
    return [(0, a), (a, b)] + [(i, i + 1) for i in range(b, T)]


@pytest.mark.parametrize("position", ["rope", "learned"])
@pytest.mark.parametrize("window", [1, 2, 3], ids=["w1", "w2", "w3"])
@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_equals_full_forward(kind, window, position):
    g = torch.Generator().manual_seed(hash((kind, window)) % 1000)
    model = make(kind, window, position)
    x = torch.randint(0, 97, (3, 21), generator=g)
    full = model(x)
    for trial in range(2):
        cache = model.new_cache(3, 32)
        out = torch.cat([model(x[:, s:e], cache=cache) for s, e in chunks_of(21, g)], 1)
        assert (out - full).abs().max().item() <= TOL


@pytest.mark.parametrize("position", ["rope", "alibi", "learned", "none"])
@pytest.mark.parametrize("kind", ["vanilla", "kvshift", "kvshift_gate", "vshift"])
def test_left_padded_batch_equals_rows_alone(kind, position):
    g = torch.Generator().manual_seed(7)
    model = make(kind, 2, position)
    lengths = [12, 7, 1]
    rows = [torch.randint(1, 97, (n,), generator=g) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    batched = model(ids, attention_mask=mask)
    assert torch.isfinite(batched).all()
    for i, r in enumerate(rows):
        alone = model(r[None])
        assert (batched[i, T - len(r):] - alone[0]).abs().max().item() <= TOL
    # cached: prefill the padded prompts, then decode; every row equals its own full forward
    cont = torch.randint(1, 97, (3, 5), generator=g)
    cache = model.new_cache(3, T + 5)
    model(ids, attention_mask=mask, cache=cache)
    steps = torch.cat([model(cont[:, i:i + 1], cache=cache) for i in range(5)], 1)
    for i, r in enumerate(rows):
        alone = model(torch.cat([r, cont[i]])[None])[0, -5:]
        assert (steps[i] - alone).abs().max().item() <= TOL


def test_pads_never_leak_into_real_rows():
    model = make("kvshift", 1)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    a = model(ids, attention_mask=mask)
    ids2 = ids.clone()
    ids2[0, :2] = torch.tensor([50, 60])  # change only the pads
    b = model(ids2, attention_mask=mask)
    assert torch.equal(a[0, 2:], b[0, 2:])


@pytest.fixture(params=[False, True], ids=["masked", "varlen"])
def varlen(request, monkeypatch):
    """Packed attention through SDPA's block-diagonal mask (the CPU default) or through the varlen op (what
    CUDA runs; here its exact CPU math)."""
    monkeypatch.setattr("kvshift.layers.attention.VARLEN_OFF_CUDA", request.param)
    return request.param


@pytest.mark.parametrize("position", ["rope", "learned"])
@pytest.mark.parametrize("kind", ["vanilla", "kvshift", "kshift"])
@pytest.mark.parametrize("window", [1, 3], ids=["w1", "w3"])
def test_packed_equals_separate_documents(kind, window, position, varlen):
    g = torch.Generator().manual_seed(11)
    model = make(kind, window, position)
    lengths = [5, 1, 9, 3]
    docs = [torch.randint(0, 97, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    sep = torch.cat([model(d[None]) for d in docs], 1)
    packed = model(torch.cat(docs)[None], cu_seqlens=cu)
    assert (packed - sep).abs().max().item() <= TOL
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    assert (model(torch.cat(docs)[None], position_ids=pos) - sep).abs().max().item() <= TOL
    # two packed rows at once through position_ids
    rows = torch.stack([torch.cat(docs), torch.cat(docs[::-1])])
    pos2 = torch.stack([pos[0], torch.cat([torch.arange(n) for n in lengths[::-1]])])
    out = model(rows, position_ids=pos2)
    sep2 = torch.cat([model(d[None]) for d in docs[::-1]], 1)
    assert (out[1] - sep2[0]).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", ["vanilla", "kvshift", "vshift"])
def test_packed_gradients_equal_on_the_varlen_path(kind, monkeypatch):
    """Training on packed rows: the loss and every parameter's gradient are the same through the varlen op
    (CUDA's path for packed batches) as through SDPA with the block-diagonal mask."""
    g = torch.Generator().manual_seed(5)
    model = make(kind, 1, n_kv_heads=2).train()
    x = torch.randint(0, 97, (2, 19), generator=g)
    pos = torch.stack([torch.cat([torch.arange(n) for n in (7, 1, 11)]), torch.cat([torch.arange(n) for n in (19,)])])
    grads = []
    for on in (False, True):
        monkeypatch.setattr("kvshift.layers.attention.VARLEN_OFF_CUDA", on)
        model.zero_grad()
        loss = model(x, position_ids=pos).float().logsumexp(-1).mean()
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert abs(l0 - l1) <= 1e-5 and g0.keys() == g1.keys() and len(g0) == len(list(model.parameters()))
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-5, rtol=1e-4), n


def test_packing_resets_the_shift():
    """Without the reset, a document's first token would see the previous document's last token."""
    model = make("kvshift", 1)
    d1, d2 = torch.tensor([3, 4, 5]), torch.tensor([6, 7])
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    packed = model(torch.cat([d1, d2])[None], cu_seqlens=cu)
    joined = model(torch.cat([d1, d2])[None])
    alone = model(d2[None])
    assert (packed[0, 3:] - alone[0]).abs().max() <= TOL
    assert (joined[0, 3:] - alone[0]).abs().max() > 1e-2


def test_identity_coefficients_give_vanilla_logits():
    van = make("vanilla", seed=3)
    x = torch.randint(0, 97, (2, 17))
    for kind in ["kvshift", "kvshift_clamp", "kshift", "vshift"]:
        for window in (1, 2):
            m = LM(ModelConfig.from_name("debug", attention=kind, shift_window=window), seed=3).eval()
            m.load_state_dict(van.state_dict(), strict=False)
            with torch.no_grad():
                for layer in m.layers:
                    for name in ("shift_k", "shift_v"):
                        p = getattr(layer.attention, name, None)
                        if p is not None:
                            p.zero_()
                            p[:, 0] = 1
            torch.testing.assert_close(m(x), van(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"position": "learned"}, {"mlp": "gelu"}, {"position": "alibi"}],
                         ids=["default", "learned", "gelu", "alibi"])
def test_shared_weights_identical_across_arms(options):
    """Every attention kind and shift_init builds the same shared weights from the same seed."""
    a = LM(ModelConfig.from_name("debug", attention="vanilla", **options), seed=5)
    sa = a.state_dict()
    for kind in ["kvshift", "kvshift_gate", "kshift"]:
        for shift_init in ["uniform", "half"]:
            b = LM(ModelConfig.from_name("debug", attention=kind, shift_init=shift_init, **options), seed=5)
            sb = b.state_dict()
            for k, v in sa.items():
                assert torch.equal(v, sb[k]), (kind, shift_init, k)
            assert all("shift_" in k for k in set(sb) - set(sa))
    b = LM(ModelConfig.from_name("debug", **options), seed=5)
    assert set(b.state_dict()) - set(sa) == {f"layers.{i}.attention.shift_{s}" for i in range(2) for s in "kv"}


def test_paper_init_and_coefficient_layout():
    m = LM(ModelConfig.from_name("debug", attention="kvshift", n_kv_heads=2), seed=0)
    att = m.layers[0].attention
    assert att.shift_k.shape == (2, 2) and att.shift_v.shape == (2, 2)
    torch.testing.assert_close(att.shift_k.sum(1), torch.ones(2))
    assert ((att.shift_k[:, 0] >= 0) & (att.shift_k[:, 0] <= 1)).all()
    alpha, beta = att.shift_coefficients()
    assert torch.equal(alpha, att.shift_k.detach()) and torch.equal(beta, att.shift_v.detach())
    m3 = LM(ModelConfig.from_name("debug", attention="kvshift", shift_window=3), seed=0)
    c = m3.layers[0].attention.shift_k
    assert c.shape == (2, 4)
    torch.testing.assert_close(c.sum(1), torch.ones(2))
    # gate: sigmoid for window 1; clamp stays in [0, 1]; one-sided kinds report identity on the other side
    gate = LM(ModelConfig.from_name("debug", attention="kvshift_gate"), seed=0).layers[0].attention
    a, _ = gate.shift_coefficients()
    torch.testing.assert_close(a[:, 0], torch.sigmoid(gate.shift_k_gate[:, 0]).detach())
    torch.testing.assert_close(a.sum(1), torch.ones(2))
    clamp = LM(ModelConfig.from_name("debug", attention="kvshift_clamp"), seed=0).layers[0].attention
    with torch.no_grad():
        clamp.shift_k.copy_(torch.tensor([[1.7, -0.4], [0.2, 0.3]]))
    assert torch.equal(clamp.shift_coefficients()[0], torch.tensor([[1.0, 0.0], [0.2, 0.3]]))
    k_only = LM(ModelConfig.from_name("debug", attention="kshift"), seed=0).layers[0].attention
    assert torch.equal(k_only.shift_coefficients()[1], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert not hasattr(k_only, "shift_v")


def test_cache_overflow_raises():
    model = make()
    cache = model.new_cache(1, 8)
    model(torch.randint(0, 97, (1, 6)), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, 97, (1, 3)), cache=cache)


def test_generate_greedy_matches_argmax_of_full_forward():
    model = make("kvshift", 2)
    prompt = torch.randint(0, 97, (2, 6))
    out = model.generate(prompt, 8, temperature=0)
    assert out.shape == (2, 14)
    full = model(out[:, :-1])
    assert torch.equal(full[:, 5:].argmax(-1), out[:, 6:])
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    s1 = model.generate(prompt, 5, temperature=0.8, top_k=10, top_p=0.9, generator=g1)
    s2 = model.generate(prompt, 5, temperature=0.8, top_k=10, top_p=0.9, generator=g2)
    assert torch.equal(s1, s2)
    eos = int(out[0, 6])
    stopped = model.generate(prompt, 8, temperature=0, eos_token_id=eos)
    assert (stopped[0, 6:] == eos).all()


def test_generate_left_padded_rows_equal_unpadded():
    model = make("kvshift", 1)
    a = torch.randint(1, 97, (1, 7))
    b = torch.randint(1, 97, (1, 3))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = (torch.arange(7) >= torch.tensor([[0], [4]])).long()
    out = model.generate(ids, 6, temperature=0, attention_mask=mask)
    assert torch.equal(out[0, 7:], model.generate(a, 6, temperature=0)[0, 7:])
    assert torch.equal(out[1, 7:], model.generate(b, 6, temperature=0)[0, 3:])


@pytest.mark.parametrize("options", [{}, {"position": "learned", "mlp": "gelu", "shift_init": "half"}],
                         ids=["default", "learned-gelu-half"])
def test_compile_fullgraph_and_training_reduces_loss(options):
    torch.manual_seed(0)
    model = LM(ModelConfig.from_name("debug", attention="kvshift", shift_impl="naive", **options), seed=0)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=3e-3, betas=(0.9, 0.95))
    x = torch.randint(0, 97, (4, 33))
    losses = []
    for _ in range(8):
        logits = compiled(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    assert model.layers[0].attention.shift_k.grad is not None
    pos = torch.cat([torch.arange(12), torch.arange(20)]).expand(4, 32)  # packed documents, fullgraph too
    with torch.no_grad():
        torch.testing.assert_close(compiled(x[:, :-1], position_ids=pos), model(x[:, :-1], position_ids=pos))


def test_compile_inductor_matches_eager():
    model = make("kvshift", 2)
    x = torch.randint(0, 97, (2, 16))
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


BAD_CONFIG = {
    "attention": ({"attention": "kvshift2"}, "attention must be one of"),
    "gqa": ({"n_heads": 4, "n_kv_heads": 3}, "divisible by n_kv_heads"),
    "window": ({"shift_window": 4}, "shift_window"),
    "position": ({"position": "rotary"}, r"position must be one of \('rope', 'alibi', 'learned', 'none'\)"),
    "mlp": ({"mlp": "relu"}, r"mlp must be one of \('swiglu', 'gelu'\)"),
    "shift_init": ({"shift_init": "zeros"}, r"shift_init must be one of \('uniform', 'half'\)"),
    "dim": ({"dim": 50}, "dim .* divisible by n_heads"),
    "vocab": ({"vocab_size": 0}, "vocab_size"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIG), ids=list(BAD_CONFIG))
def test_bad_config_names_the_field(case):
    kw, msg = BAD_CONFIG[case]
    with pytest.raises(ValueError, match=msg):
        ModelConfig.from_name("debug", **kw)


def test_bad_model_input():
    model = make()
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randn(1, 4))
    with pytest.raises(ValueError, match="left-padded"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="cu_seqlens must end"):
        model(torch.tensor([[1, 2, 3]]), cu_seqlens=torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_name("nope")
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({"dimension": 3})


def test_presets_sizes():
    assert abs(ModelConfig.from_name("lm-25m").non_embedding_params() / 25.7e6 - 1) < 0.02
    for options in [{}, {"mlp": "gelu"}, {"position": "learned"}, {"position": "learned", "mlp": "gelu"}]:
        m = LM(ModelConfig.from_name("debug", **options), seed=0)
        assert m.num_params() == m.config.non_embedding_params(), options
    for name in kvshift.PRESETS:
        ModelConfig.from_name(name)


@pytest.mark.parametrize("fuse_attention", [True, False], ids=["one-op", "sdpa"])
@pytest.mark.parametrize("kind,window", [("kvshift", 1), ("kvshift", 2), ("vshift", 1), ("kshift", 1),
                                         ("kvshift_gate", 1), ("vanilla", 1)],
                         ids=["kv-w1", "kv-w2", "v-w1", "k-w1", "gate-w1", "vanilla"])
def test_fused_backend_matches_naive_in_the_model(kind, window, fuse_attention):
    """The Triton path (interpreter on CPU) gives the naive model's logits, gradients, cached decoding
    (the one-kernel decode step, vanilla included) and packed results; with fuse_attention the
    training forward goes through the one-op shift + attention (`kvshift.ops.shift.attention`)."""
    pytest.importorskip("triton")
    from kvshift.layers.attention import set_fused_attention
    from kvshift.ops.shift import triton_available
    if not triton_available():
        pytest.skip("triton kernels unavailable (no CUDA and TRITON_INTERPRET unset)")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # Triton on CUDA tensors there, the interpreter here
    naive = make(kind, window, shift_impl="naive").to(dev)
    fused = LM(ModelConfig.from_name("debug", attention=kind, shift_window=window, shift_impl="triton"), seed=0).eval()
    fused.load_state_dict(naive.state_dict())
    fused.to(dev)
    set_fused_attention(fused, fuse_attention)
    calls = []
    import kvshift.layers.attention as attn_mod
    real = attn_mod.shift_attention
    attn_mod.shift_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        x = torch.randint(0, 97, (2, 13)).to(dev)
        ref, out = naive(x), fused(x)
    finally:
        attn_mod.shift_attention = real
    both_shifted = kind in ("kvshift", "kvshift_gate")
    one_op = fuse_attention and both_shifted and dev == "cpu"  # on CUDA the one-op needs bf16: fp32 takes SDPA
    assert len(calls) == (fused.config.n_layers if one_op else 0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    ref.square().mean().backward()
    out.square().mean().backward()
    for (n, a), b in zip(naive.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=n)
    with torch.no_grad():
        cache = fused.new_cache(2, 16)
        steps = torch.cat([fused(x[:, :5], cache=cache)] + [fused(x[:, i:i + 1], cache=cache) for i in range(5, 13)], 1)
        assert (steps - ref).abs().max() <= TOL
        pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3]]).to(dev)
        torch.testing.assert_close(fused(x, position_ids=pos), naive(x, position_ids=pos), rtol=1e-4, atol=1e-4)
        cu = torch.tensor([0, 4, 13], dtype=torch.int32, device=dev)
        torch.testing.assert_close(fused(x[0][None], cu_seqlens=cu), naive(x[0][None], cu_seqlens=cu), rtol=1e-4, atol=1e-4)


def test_rope_tables_equal_computed_rope():
    """The cached fp32 tables (slice for 0..T-1, gather otherwise) give exactly the computed RoPE, and
    positions past the tables fall back to computing."""
    from kvshift.ops.rope import rope_cos_sin

    m = make()
    cfg = m.config
    pos = torch.tensor([[0, 5, 3, cfg.max_seq_len - 1]])
    ref = rope_cos_sin(pos, cfg.head_dim, cfg.rope_base)
    for got in (m._rope(pos, cfg.max_seq_len - 1, False), m._rope(pos, None, False)):
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
    ar = torch.arange(9).view(1, 9)
    assert all(torch.equal(a, b) for a, b in zip(m._rope(ar, 8, True), rope_cos_sin(ar, cfg.head_dim, cfg.rope_base)))
    far = torch.tensor([[cfg.max_seq_len + 3]])
    assert all(torch.equal(a, b) for a, b in zip(m._rope(far, cfg.max_seq_len + 3, False),
                                                 rope_cos_sin(far, cfg.head_dim, cfg.rope_base)))
    assert "rope_cos" not in m.state_dict()  # not a checkpoint entry


def test_logits_to_keep_selects_positions_and_generate_prefills_only_the_last():
    model = make("kvshift", 2)
    x = torch.randint(0, 97, (2, 9))
    full = model(x)
    assert torch.allclose(model(x, logits_to_keep=3), full[:, -3:], atol=1e-6)
    assert torch.allclose(model(x, logits_to_keep=20), full, atol=1e-6)  # more than T: every position
    idx = torch.tensor([0, 4, 8])
    assert torch.allclose(model(x, logits_to_keep=idx), full[:, idx], atol=1e-6)
    for bad in (-1, 1.5, True, torch.tensor([[1]]), torch.tensor([0.5])):
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(x, logits_to_keep=bad)
    rows = []  # positions the output head sees per call: the prefill of a 9-token prompt needs only its last
    hook = model.output.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[1]))
    try:
        out = model.generate(x, 3, temperature=0)
    finally:
        hook.remove()
    assert rows == [1, 1, 1]
    assert torch.equal(model(out[:, :-1])[:, 8:].argmax(-1), out[:, 9:])
