"""Head analysis: recomputed attention maps reproduce each layer's output; scores; the Theorem 2
induction head scores as one; `kvshift analyze` writes JSON and PNG."""

import json

import pytest
import torch

from kvshift import LM, ModelConfig
from kvshift.eval.analysis import (analyze, attention_probs, head_scores, layer_attention_probs,
                                   repeated_random_tokens)
from kvshift.layers.attention import AttentionContext
from kvshift.ops.shift import kv_shift
from kvshift.theory import induction_head, random_embeddings

VARIANTS = {
    "kvshift-rope-gqa": dict(attention="kvshift"),
    "kvshift-alibi": dict(attention="kvshift", position="alibi"),
    "gate-w2": dict(attention="kvshift_gate", shift_window=2),
    "vshift": dict(attention="vshift"),
    "vanilla-nopos": dict(attention="vanilla", position="none"),
    "dconv": dict(attention="kvshift", mixer="dconv"),
    "keyoffset": dict(attention="vanilla", mixer="keyoffset"),
    "canon": dict(attention="kvshift", mixer="canon"),
}


def _lm(seed=0, **kw):
    lm = LM(ModelConfig.from_name("debug", **kw), seed=seed).eval()
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "shift_" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
            elif p.dim() == 2:
                p.mul_(4.0)  # sharper attention than the init
    return lm


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left-padded"])
@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_recomputed_probs_reproduce_each_layer_output(variant, padded):
    lm = _lm(**VARIANTS[variant])
    x = torch.randint(1, 97, (3, 23), generator=torch.Generator().manual_seed(1))
    mask = None
    if padded:
        mask = torch.ones_like(x)
        mask[0, :5], mask[2, :9] = 0, 0
    outputs, inputs = {}, {}
    hooks = []
    for i, layer in enumerate(lm.layers):
        hooks.append(layer.attention.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)))
        hooks.append(layer.attention.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a)))
    probs = attention_probs(lm, x, attention_mask=mask)
    lm(x, attention_mask=mask)
    for h in hooks:
        h.remove()
    for i, layer in enumerate(lm.layers):
        att = layer.attention
        p = probs[i]
        assert p.shape == (3, att.n_heads, 23, 23)
        assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)
        assert (p.triu(1) == 0).all()  # causal
        h, ctx = inputs[i]
        B, T, _ = h.shape
        v = att.wv(h).view(B, T, att.n_kv_heads, att.head_dim)
        if att.qkv_mixer is not None:
            v = att.qkv_mixer(ctx, v.new_zeros(B, T, att.n_heads, att.head_dim), v, v)[2]
        if ctx.token_valid is not None:
            v = v * ctx.token_valid.view(B, T, 1, 1)
        coef = att._coefficients("v")
        if coef is not None:
            v = kv_shift(v, coef, impl="naive")
        v = v.repeat_interleave(att.n_heads // att.n_kv_heads, dim=2)
        o = torch.einsum("bhts,bshd->bthd", p, v).reshape(B, T, -1)
        assert (att.wo(o) - outputs[i]).abs().max().item() <= 1e-4, f"layer {i}"


def test_head_scores_on_known_maps():
    n, T = 5, 10
    prev = torch.zeros(1, 1, T, T)
    prev[0, 0, 0, 0] = 1
    for i in range(1, T):
        prev[0, 0, i, i - 1] = 1
    induct = torch.zeros(1, 1, T, T)
    induct[0, 0, :n] = prev[0, 0, :n]
    for i in range(n, T):
        induct[0, 0, i, i - n + 1] = 1
    s_prev, s_ind = head_scores(prev, n), head_scores(induct, n)
    assert s_prev["previous_token"].item() == 1 and s_prev["prefix_matching"].item() == 0
    assert s_ind["prefix_matching"].item() == 1 and s_ind["duplicate_token"].item() == 0
    with pytest.raises(ValueError):
        head_scores(prev, 4)


def _theorem2_scores(attention):
    dim, n, vocab = 64, 20, 200
    g = torch.Generator().manual_seed(0)
    emb = random_embeddings(vocab, dim, g)
    tokens = repeated_random_tokens(n, 4, vocab, low=0, seed=1)
    L = tokens.shape[1]
    pos = torch.arange(L).view(1, L)
    ctx = AttentionContext(distance=(pos.unsqueeze(2) - pos.unsqueeze(1)).float().expand(4, L, L),
                           mask=torch.ones(L, L, dtype=torch.bool).tril().view(1, 1, L, L))
    probs = layer_attention_probs(induction_head(dim, attention=attention), emb[tokens], ctx)
    return {k: v.item() for k, v in head_scores(probs, n).items()}


def test_theorem2_layer_is_an_induction_head():
    kv = _theorem2_scores("kvshift")
    assert kv["prefix_matching"] > 0.95
    vanilla = _theorem2_scores("vanilla")  # same weights without the shift: each token attends to itself
    assert vanilla["prefix_matching"] < 0.05


def test_analyze_writes_json_and_png(tmp_path):
    lm = _lm(seed=2, attention="kvshift")
    rep = analyze(lm, n=20, batch=3, out=tmp_path, prefix=0)
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert saved["scores"] == rep["scores"]
    png = (tmp_path / "analysis.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    L, H = lm.config.n_layers, lm.config.n_heads
    for name, mat in rep["scores"].items():
        t = torch.tensor(mat)
        assert t.shape == (L, H) and (t >= 0).all() and (t <= 1).all(), name
    assert len(rep["shift"]) == L
    alpha = torch.tensor(rep["shift"][0]["alpha"])
    assert torch.equal(alpha, lm.layers[0].attention.shift_k.detach())


def test_analyze_cli_on_exported_and_training_dirs(tmp_path, capsys):
    pytest.importorskip("transformers")
    from safetensors.torch import save_file

    from kvshift.cli import main
    from kvshift.hf import KVShiftForCausalLM

    lm = _lm(seed=3)
    hf_dir, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    KVShiftForCausalLM.from_lm(lm).save_pretrained(hf_dir)
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, ckpt / "model.safetensors")
    (ckpt / "model_config.json").write_text(json.dumps(lm.config.to_dict()))
    reps = []
    for src in (hf_dir, ckpt):
        out = tmp_path / f"out_{src.name}"
        assert main(["analyze", str(src), "--out", str(out), "--n", "16", "--batch", "2"]) == 0
        reps.append(json.loads((out / "analysis.json").read_text()))
        assert (out / "analysis.png").is_file()
    assert reps[0]["scores"] == reps[1]["scores"]
    assert "prefix_matching" in capsys.readouterr().out
    (tmp_path / "bad").mkdir()
    assert main(["analyze", str(tmp_path / "bad")]) == 2
