"""Stateless KV shifting: a standard cache of rotated raw k and raw v, shifted on read, gives the
logits of the full forward (every attention kind, windows 1-3, every position scheme, GQA, random
prefill chunkings, left padding, packed documents, crop and reorder)."""

import pytest
import torch

import kvshift
from kvshift import LM, ModelConfig
from kvshift.layers.stateless import read_shifted, rotation_tables, slot_positions
from kvshift.models import RawKVCache
from kvshift.ops.rope import apply_rope, rope_cos_sin
from kvshift.ops.shift import naive

KINDS = list(kvshift.ATTENTION_KINDS)
TOL = 1e-6  # fp64 models; RoPE itself rounds through fp32 (kvshift.ops.rope), in both paths


def make(kind="kvshift", window=1, position="rope", seed=0, **kw):
    cfg = ModelConfig.from_name("debug", attention=kind, shift_window=window, position=position, **kw)
    model = LM(cfg, seed=seed).eval()
    with torch.no_grad():  # coefficients off the paper init, matrices scaled up: every tap matters
        for name, p in model.named_parameters():
            if "shift_" in name:
                p.add_(torch.randn(p.shape) * 0.3)
            elif p.dim() == 2:
                p.mul_(3.0)
    return model.double()


def chunks_of(T, g):
    """Random chunking: a prefill, maybe a continuation chunk, then single tokens and small chunks."""
    a = int(torch.randint(1, T - 4, (1,), generator=g))
    b = int(torch.randint(a + 1, T - 2, (1,), generator=g))
    out, i = [(0, a), (a, b)], b
    while i < T:
        n = min(int(torch.randint(1, 4, (1,), generator=g)), T - i)
        out.append((i, i + n))
        i += n
    return out


def run_chunks(model, x, chunks, mask=None, cache=None):
    cache = cache or RawKVCache.for_model(model, x.shape[0], x.shape[1] + 4)
    outs = []
    with torch.no_grad():
        for s, e in chunks:
            outs.append(model(x[:, s:e], cache=cache, attention_mask=None if mask is None else mask[:, :e]))
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("position", ["rope", "alibi", "learned", "none"])
@pytest.mark.parametrize("window", [1, 2, 3], ids=["w1", "w2", "w3"])
@pytest.mark.parametrize("kind", KINDS)
def test_raw_cache_chunked_equals_full_forward(kind, window, position):
    g = torch.Generator().manual_seed(17 * window + KINDS.index(kind))
    model = make(kind, window, position)
    x = torch.randint(0, 97, (3, 19), generator=g)
    with torch.no_grad():
        full = model(x)
    for _ in range(2):
        got, cache = run_chunks(model, x, chunks_of(19, g))
        assert (got - full).abs().max().item() <= TOL
        assert cache.length == 19 and cache.k[0].shape[1] == model.config.n_kv_heads  # GQA: 2 KV heads


@pytest.mark.parametrize("position", ["rope", "alibi"])
@pytest.mark.parametrize("window", [1, 2, 3], ids=["w1", "w2", "w3"])
@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_raw_cache_equals_rows_alone(kind, window, position):
    g = torch.Generator().manual_seed(5)
    model = make(kind, window, position)
    lengths = [14, 9, 11]
    T = max(lengths)
    rows = [torch.randint(0, 97, (n,), generator=g) for n in lengths]
    x = torch.stack([torch.cat([torch.zeros(T - n, dtype=torch.long), r]) for n, r in zip(lengths, rows)])
    mask = torch.stack([torch.cat([torch.zeros(T - n), torch.ones(n)]) for n in lengths]).long()
    x = torch.cat([x, torch.randint(0, 97, (3, 4), generator=g)], 1)  # 4 decoded tokens after the prompt
    mask = torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], 1)
    got, _ = run_chunks(model, x, [(0, 6), (6, T), (T, T + 1), (T + 1, T + 4)], mask)
    with torch.no_grad():
        for i, n in enumerate(lengths):
            alone = model(x[i:i + 1, T - n:])
            assert (got[i:i + 1, T - n:] - alone).abs().max().item() <= TOL


@pytest.mark.parametrize("window", [1, 2, 3])
def test_crop_and_reorder(window):
    """Roll back rejected speculative tokens, then take other ones; reorder rows like beam search."""
    g = torch.Generator().manual_seed(window)
    model = make("kvshift", window)
    x = torch.randint(0, 97, (2, 16), generator=g)
    _, cache = run_chunks(model, x, [(0, 10), (10, 16)])
    cache.crop(-4)  # 12 slots left
    assert cache.length == 12 and cache.get_seq_length() == 12
    alt = torch.randint(0, 97, (2, 5), generator=g)
    with torch.no_grad():
        got = model(alt, cache=cache)
        full = model(torch.cat([x[:, :12], alt], 1))[:, 12:]
    assert (got - full).abs().max().item() <= TOL
    cache.crop(7)
    cache.reorder(torch.tensor([1, 1]))
    with torch.no_grad():
        got = model(alt[1:, :2].expand(2, -1), cache=cache)
        full = model(torch.cat([x[1:, :7], alt[1:, :2]], 1))[:, 7:]
    assert (got - full.expand(2, -1, -1)).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="length"):
        cache.crop(100)


@pytest.mark.parametrize("window", [1, 2, 3])
def test_read_shifted_equals_shift_then_rope_on_packed_documents(window):
    """The read over rotated raw keys equals RoPE(shift(k)) with positions restarting per document."""
    g = torch.Generator().manual_seed(window)
    H, D = 3, 8
    cu = torch.tensor([0, 5, 6, 13, 20], dtype=torch.int32)
    N = int(cu[-1])
    k = torch.randn(N, H, D, generator=g, dtype=torch.float64)
    v = torch.randn(N, H, D, generator=g, dtype=torch.float64)
    wk = torch.randn(H, window + 1, generator=g, dtype=torch.float64)
    wv = torch.randn(H, window + 1, generator=g, dtype=torch.float64)
    starts = torch.zeros(1, N, dtype=torch.bool)
    starts[0, cu[:-1].long()] = True
    valid = torch.ones(1, N, dtype=torch.bool)
    pos = slot_positions(valid, starts)
    assert pos[0, :7].tolist() == [0, 1, 2, 3, 4, 0, 0]
    cos, sin = (t.double() for t in rope_cos_sin(pos[0], D, 10_000.0))
    rot = lambda t: torch.cat([t[..., :D // 2] * cos[:, None] - t[..., D // 2:] * sin[:, None],  # noqa: E731
                               t[..., D // 2:] * cos[:, None] + t[..., :D // 2] * sin[:, None]], -1)
    want_k = rot(naive.shift_varlen(k, wk, cu))
    want_v = naive.shift_varlen(v, wv, cu)
    cj, sj = rotation_tables(window, D, 10_000.0)
    got_k, got_v = read_shifted(rot(k).permute(1, 0, 2)[None], v.permute(1, 0, 2)[None], wk, wv, pos, cj, sj)
    torch.testing.assert_close(got_k[0].permute(1, 0, 2), want_k, atol=1e-6, rtol=0)  # fp32 RoPE angles
    torch.testing.assert_close(got_v[0].permute(1, 0, 2), want_v, atol=1e-12, rtol=0)


def test_rotations_compose():
    D = 16
    x = torch.randn(5, D, dtype=torch.float64)
    cj, sj = rotation_tables(3, D, 100_000.0)
    c7, s7 = rope_cos_sin(torch.tensor([7]), D)
    c9, s9 = rope_cos_sin(torch.tensor([9]), D)
    two_then_seven = apply_rope(apply_rope(x.view(1, 5, 1, D).float(), c7[None], s7[None]).double(),
                                cj[2:3].float()[None], sj[2:3].float()[None])
    torch.testing.assert_close(two_then_seven, apply_rope(x.view(1, 5, 1, D).float(), c9[None], s9[None]).double(),
                               atol=1e-5, rtol=0)


def test_bad_input_names_the_argument():
    C = torch.zeros(1, 2, 4, 8)
    pos = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="C must be"):
        read_shifted(C[0], C, None, None, pos)
    with pytest.raises(ValueError, match="pos must"):
        read_shifted(C, C, None, None, pos[:, :3])
    with pytest.raises(ValueError, match="coef_k"):
        read_shifted(C, C, torch.ones(3, 2), None, pos)
    with pytest.raises(ValueError, match="cos"):
        read_shifted(C, C, torch.ones(2, 2), None, pos, torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="doc_start"):
        slot_positions(torch.ones(1, 4, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch_size"):
        RawKVCache(1, 0, 8, 2, 8)


@pytest.mark.parametrize("kind", ["kvshift", "vanilla"])
def test_lm_generate_stateless_equals_default(kind):
    model = make(kind, 2).float()
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(1, 97, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    for kw in (dict(temperature=0), dict(temperature=0, attention_mask=mask)):
        want = model.generate(ids, 9, **kw)
        assert torch.equal(model.generate(ids, 9, stateless=True, **kw), want)
    sampled = [model.generate(ids, 9, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3),
                              stateless=s) for s in (False, True)]
    assert torch.equal(*sampled)


@pytest.mark.parametrize("position", ["rope", "alibi", "none"])
@pytest.mark.parametrize("kind,window", [("kvshift", 1), ("kvshift", 3), ("kshift", 2), ("vshift", 1),
                                         ("kvshift_gate", 2)])
def test_score_domain_decode_equals_the_reference_read(kind, window, position, monkeypatch):
    """Decoding chunks (T <= DECODE_MAX_T) attend in the score domain (`decode_attend`); the reference read
    (the cache re-shifted, then SDPA) gives the same logits, with GQA, left padding and 1-3-token chunks."""
    import kvshift.layers.stateless as st

    model = make(kind, window, position, n_kv_heads=2)
    g = torch.Generator().manual_seed(5 + window)
    x = torch.randint(0, 97, (3, 17), generator=g)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    mask[2, :1] = 0
    chunks = chunks_of(17, g)
    fast, _ = run_chunks(model, x, chunks, mask)
    monkeypatch.setattr(st, "DECODE_MAX_T", 0)  # every chunk through the reference read
    ref, _ = run_chunks(model, x, chunks, mask)
    real = mask.bool()
    assert (fast - ref)[real].abs().max() <= TOL
    monkeypatch.setattr(st, "DECODE_MAX_T", 100)  # every chunk, the prefill too, in the score domain
    all_fast, _ = run_chunks(model, x, chunks, mask)
    assert (all_fast - ref)[real].abs().max() <= TOL


def test_score_domain_decode_in_bf16_is_close_to_the_reference():
    """In bf16 the two reads round differently (shifted keys vs per-tap scores): close, not equal."""
    import kvshift.layers.stateless as st

    model = make("kvshift", 2, n_kv_heads=2).to(torch.bfloat16)
    x = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    chunks = [(0, 16)] + [(i, i + 1) for i in range(16, 24)]
    fast, _ = run_chunks(model, x, chunks)
    old, st.DECODE_MAX_T = st.DECODE_MAX_T, 0
    try:
        ref, _ = run_chunks(model, x, chunks)
    finally:
        st.DECODE_MAX_T = old
    err = (fast.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert err < 0.03, err


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no-rope"])
@pytest.mark.parametrize("window", [1, 3])
def test_score_domain_decode_reads_the_cached_keys_once(window, rope):
    """Every tap's query goes through one matmul against the cached keys (and one for the values): the cache
    is read once per step, however wide the shift, as a vanilla decode step reads it."""
    from types import SimpleNamespace

    from torch.fx.experimental.proxy_tensor import make_fx

    from kvshift.layers.stateless import decode_attend

    g = torch.Generator().manual_seed(7)
    B, H, Hk, T, S, D, W = 2, 4, 2, 1, 9, 8, window + 1
    q, C, V = torch.randn(B, H, T, D, generator=g), torch.randn(B, Hk, S, D, generator=g), torch.randn(B, Hk, S, D,
                                                                                                       generator=g)
    coef_k, coef_v = torch.randn(Hk, W, generator=g), torch.randn(Hk, W, generator=g)
    pos = torch.arange(S).expand(B, S)
    cos, sin = rotation_tables(window, D, 10_000.0, dtype=torch.float32) if rope else (None, None)
    attn = SimpleNamespace(position="rope" if rope else "none")
    ctx = SimpleNamespace(mask=None, causal=False)
    fn = lambda q, C, V: decode_attend(attn, q, C, V, coef_k, coef_v, pos, cos, sin, ctx)  # noqa: E731
    graph = make_fx(fn)(q, C, V).graph
    matmuls = [n for n in graph.nodes if n.op == "call_function"
               and n.target in (torch.ops.aten.bmm.default, torch.ops.aten.mm.default)]
    assert len(matmuls) == 2, [str(n.target) for n in graph.nodes if n.op == "call_function"]
    # the same scores as the reference read: the cache shifted, then plain attention
    k_hat, v_hat = read_shifted(C, V, coef_k, coef_v, pos, cos, sin)
    ref = torch.softmax(q.view(B, Hk, H // Hk, D) @ k_hat.transpose(-1, -2) * D ** -0.5, -1) @ v_hat
    assert torch.allclose(fn(q, C, V), ref.view(B, H, T, D), atol=1e-5)


@pytest.mark.parametrize("score_domain", [False, True], ids=["copy", "scores"])
def test_compiled_decode_reads_through_the_shifted_copy(score_domain, monkeypatch):
    """Inside torch.compile a decoding chunk takes the shifted copy + SDPA (vanilla's attention kernel), not the
    score-domain read, unless SCORE_DOMAIN_WHEN_COMPILED asks for it; both give the uncompiled logits."""
    import kvshift.layers.stateless as st

    model = make("kvshift", 2, n_kv_heads=2)
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    chunks = [(0, 8)] + [(i, i + 1) for i in range(8, 12)]
    want, _ = run_chunks(model, x, chunks)
    calls = []
    real = st.decode_attend
    monkeypatch.setattr(st, "decode_attend", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(st, "SCORE_DOMAIN_WHEN_COMPILED", score_domain)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="eager")
    try:
        got, _ = run_chunks(model, x, chunks)
    finally:
        del model.forward
        torch._dynamo.reset()
    assert (got - want).abs().max() <= TOL
    assert bool(calls) == score_domain


INTERPRETED = __import__("os").environ.get("TRITON_INTERPRET") == "1"
kernel_needed = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                   reason="the Triton decode kernel needs CUDA or TRITON_INTERPRET=1")
KERNEL_DEVICE = "cpu" if INTERPRETED else "cuda"


@kernel_needed
@pytest.mark.parametrize("position", ["rope", "none", "learned"])
@pytest.mark.parametrize("kind,window", [("kvshift", 1), ("kvshift", 3), ("kshift", 2), ("vshift", 1),
                                         ("kvshift_gate", 2)])
def test_decode_kernel_equals_the_pytorch_read(kind, window, position, monkeypatch):
    """A one-token step takes the flash-decoding kernel (DECODE_KERNEL "always": on a CPU under the Triton
    interpreter) when every row's real slots are one run; the logits equal the PyTorch read's, with GQA, left
    padding and a row whose first real token arrives late."""
    import kvshift.layers.stateless_kernel as sk

    model = make(kind, window, position, n_kv_heads=2).float().to(KERNEL_DEVICE)
    g = torch.Generator().manual_seed(11 + window)
    x = torch.randint(0, 97, (3, 14), generator=g)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    mask[2, :9] = 0  # row 2: 9 pads, then its real tokens (the last chunks are single tokens)
    x, mask = x.to(KERNEL_DEVICE), mask.to(KERNEL_DEVICE)
    chunks = [(0, 10)] + [(i, i + 1) for i in range(10, 14)]
    monkeypatch.setattr(sk, "DECODE_KERNEL", "never")
    want, _ = run_chunks(model, x, chunks, mask)
    calls = []
    import kvshift.ops.shift.paged_decode as pd

    real = pd.dense_shift_decode  # counted where the kernel launches (kernel_decode may decline a layout)
    monkeypatch.setattr(pd, "dense_shift_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(sk, "DECODE_KERNEL", "always")
    got, _ = run_chunks(model, x, chunks, mask)
    ok = mask.bool()
    assert (got - want)[ok].abs().max() <= 1e-4
    assert len(calls) == 4 * model.config.n_layers  # every single-token step, every layer


def test_span_is_one_run_of_real_slots_or_none():
    """The kernel's condition: each row's real slots one run of positions 0, 1, ... (pads before, empty slots
    after); pads between tokens or a second document break it. Memoized per positions tensor and width."""
    from types import SimpleNamespace

    import kvshift.layers.stateless_kernel as sk

    cache = SimpleNamespace()
    pos = torch.tensor([[-1, -1, 0, 1, 2, -1], [0, 1, 2, 3, 4, 5]])
    start, end = sk.span(cache, pos, pos)
    assert start.tolist() == [2, 0] and end.tolist() == [5, 6]
    assert sk.span(cache, pos, pos)[0] is start  # the same forward: no second host read
    for bad in ([[0, 1, -1, 2]], [[0, 1, 0, 1]], [[1, 2, 3, 4]]):  # a hole, a second document, no start at 0
        t = torch.tensor(bad)
        assert sk.span(cache, t, t) is None, bad
    empty = torch.full((1, 3), -1)
    s, e = sk.span(cache, empty, empty)
    assert s.tolist() == [0] and e.tolist() == [0]


def test_a_failing_decode_kernel_under_auto_warns_once_and_falls_back(monkeypatch):
    """"auto": a kernel that cannot build on this machine must not stop decoding: one warning, then the PyTorch
    read for every later step (the same logits); "always" raises instead."""
    import kvshift.layers.stateless_kernel as sk
    import kvshift.ops.shift.paged_decode as pd

    model = make("kvshift", 2, n_kv_heads=2).float()
    x = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    chunks = [(0, 6), (6, 7), (7, 8), (8, 9)]
    monkeypatch.setattr(sk, "DECODE_KERNEL", "never")
    want, _ = run_chunks(model, x, chunks)
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("no such GPU")

    monkeypatch.setattr(pd, "dense_shift_decode", broken)
    monkeypatch.setattr(sk, "_broken", False)
    monkeypatch.setattr(sk, "wanted", lambda q, attn: sk.DECODE_KERNEL == "always" or not sk._broken)
    monkeypatch.setattr(sk, "DECODE_KERNEL", "auto")
    with pytest.warns(RuntimeWarning, match="decode kernel failed"):
        got, _ = run_chunks(model, x, chunks)
    assert calls == [1] and sk._broken and sk.DECODE_KERNEL == "auto"  # the user's setting is left alone
    assert (got - want).abs().max() <= 1e-6
    monkeypatch.setattr(sk, "DECODE_KERNEL", "always")
    with pytest.raises(RuntimeError, match="no such GPU"):
        run_chunks(model, x, chunks)
