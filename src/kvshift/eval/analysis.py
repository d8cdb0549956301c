"""Head analysis: attention maps recomputed from each layer's own weights, induction
(prefix-matching) and previous-token scores per head, and the learned shift coefficients.

The model is not modified: forward pre-hooks capture every `Attention` layer's input x and its
AttentionContext, and `layer_attention_probs` recomputes softmax(q k̂ᵀ / sqrt(d) + mask [+ ALiBi])
with the layer's projections, `_coefficients`, `kvshift.kv_shift` (K̂ = Σ_j α_j K_{t-j}) and RoPE
applied to q and k̂ after the shift, as the layer does.

Scores on a random sequence of n tokens repeated twice (query positions i in the second copy):
    prefix matching   attention from i to i - n + 1 (the token after the earlier occurrence)
    previous token    attention from i to i - 1 (every position i >= 1)
    duplicate token   attention from i to i - n (the earlier occurrence itself)
each averaged over positions and sequences, so it lies in [0, 1].
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from kvshift.layers.attention import Attention, AttentionContext
from kvshift.models.lm import LM
from kvshift.ops.rope import apply_rope
from kvshift.ops.shift import kv_shift
from kvshift.utils.plot import pyplot, save_figure

SCORES = ("prefix_matching", "previous_token", "duplicate_token")


@torch.no_grad()
def layer_attention_probs(layer: Attention, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """Attention probabilities (B, H, T, T) of `layer` on input x (B, T, dim), without a cache."""
    if ctx.cache is not None:
        raise ValueError("attention maps are recomputed from a full forward pass, not a cached one")
    B, T, _ = x.shape
    H, Hkv, D = layer.n_heads, layer.n_kv_heads, layer.head_dim
    q = layer.wq(x).view(B, T, H, D)
    k = layer.wk(x).view(B, T, Hkv, D)
    if layer.qkv_mixer is not None:  # ModelConfig.mixer's q/k/v mixer (kvshift.layers.mixers), as the layer does
        q, k, _ = layer.qkv_mixer(ctx, q, k, layer.wv(x).view(B, T, Hkv, D))
    if ctx.token_valid is not None:
        k = k * ctx.token_valid.view(B, T, 1, 1).to(k.dtype)  # pads are zero raw keys
    coef = layer._coefficients("k")
    if coef is not None:
        if ctx.cu_seqlens is not None:
            k = kv_shift(k.reshape(B * T, Hkv, D), coef, cu_seqlens=ctx.cu_seqlens, impl="naive").view(B, T, Hkv, D)
        else:
            k = kv_shift(k, coef, impl="naive")
    if layer.position == "rope":
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
    k = k.repeat_interleave(H // Hkv, dim=2)  # query head h reads kv head h // (H / Hkv)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / math.sqrt(D)  # (B, H, T, S)
    if layer.position == "alibi":
        scores = scores - layer.alibi_slopes.view(1, H, 1, 1).float() * ctx.distance.unsqueeze(1)
    mask = ctx.mask if ctx.mask is not None else torch.ones(T, T, dtype=torch.bool, device=x.device).tril().view(1, 1, T, T)
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1)


def _unwrap(model) -> LM:
    inner = getattr(model, "model", None)
    if isinstance(model, LM):
        return model
    if isinstance(inner, LM):  # KVShiftForCausalLM
        return inner
    raise ValueError(f"head analysis needs a kvshift.LM or KVShiftForCausalLM, got {type(model).__name__}")


@torch.no_grad()
def attention_probs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per layer, the attention probabilities (B, H, T, T) of a forward pass over input_ids (B, T)."""
    lm = _unwrap(model)
    captured: dict[int, tuple] = {}
    hooks = [layer.attention.register_forward_pre_hook(
        lambda mod, args, i=i: captured.__setitem__(i, (args[0], args[1]))) for i, layer in enumerate(lm.layers)]
    try:
        lm(input_ids, attention_mask=attention_mask)
    finally:
        for h in hooks:
            h.remove()
    return [layer_attention_probs(lm.layers[i].attention, *captured[i]) for i in range(len(lm.layers))]


def repeated_random_tokens(n: int, batch: int, vocab_size: int, *, low: int = 1, seed: int = 0,
                           prefix: int | None = None) -> torch.Tensor:
    """(batch, 2n [+1]) rows of n distinct random tokens from [low, vocab_size), repeated twice,
    optionally after one `prefix` token (e.g. BOS)."""
    if n <= 1 or batch <= 0:
        raise ValueError(f"n must be > 1 and batch > 0, got n={n}, batch={batch}")
    if vocab_size - low < n:
        raise ValueError(f"need n={n} distinct tokens but only {vocab_size - low} ids lie in [{low}, {vocab_size})")
    g = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.randperm(vocab_size - low, generator=g)[:n] + low for _ in range(batch)])
    seq = torch.cat([rows, rows], dim=1)
    if prefix is not None:
        seq = torch.cat([torch.full((batch, 1), prefix, dtype=seq.dtype), seq], dim=1)
    return seq


def head_scores(probs: torch.Tensor, n: int, offset: int = 0) -> dict[str, torch.Tensor]:
    """probs (B, H, T, T) of a repeated sequence (two copies of n tokens starting at `offset`) ->
    score name -> (H,) in [0, 1]."""
    T = probs.shape[-1]
    if T != offset + 2 * n:
        raise ValueError(f"probs cover {T} positions but offset + 2n = {offset + 2 * n}")
    second = torch.arange(offset + n, offset + 2 * n, device=probs.device)
    allq = torch.arange(offset + 1, offset + 2 * n, device=probs.device)

    def at(q, k):
        return probs[:, :, q, k].mean(dim=(0, 2)).float().cpu()

    return {"prefix_matching": at(second, second - n + 1), "previous_token": at(allq, allq - 1),
            "duplicate_token": at(second, second - n)}


def shift_table(model) -> list[dict]:
    """Per layer: alpha and beta (n_kv_heads, window+1), current-first; identity where unshifted."""
    lm = _unwrap(model)
    out = []
    for i, (a, b) in enumerate(lm.shift_coefficients()):
        out.append({"layer": i, "alpha": a.tolist(), "beta": b.tolist()})
    return out


@torch.no_grad()
def analyze(model, *, n: int = 64, batch: int = 8, seed: int = 0, prefix: int | None = None,
            out: str | Path | None = None, title: str | None = None) -> dict:
    """Scores of every head (layers x heads), shift coefficients; writes analysis.json and
    analysis.png into `out` when given."""
    lm = _unwrap(model)
    was_training = lm.training
    lm.eval()
    try:
        cfg = lm.config
        n = min(n, (cfg.vocab_size - 1), (cfg.max_seq_len - (prefix is not None)) // 2)
        ids = repeated_random_tokens(n, batch, cfg.vocab_size, seed=seed, prefix=prefix)
        ids = ids.to(next(lm.parameters()).device)
        per_layer = [head_scores(p, n, offset=int(prefix is not None)) for p in attention_probs(lm, ids)]
    finally:
        lm.train(was_training)
    scores = {s: torch.stack([d[s] for d in per_layer]) for s in SCORES}  # (L, H)
    report = {
        "n": n, "batch": batch, "seed": seed, "prefix_token": prefix, "model_config": cfg.to_dict(),
        "scores": {s: v.tolist() for s, v in scores.items()},
        "max": {s: float(v.max()) for s, v in scores.items()},
        "argmax": {s: list(divmod(int(v.argmax()), v.shape[1])) for s, v in scores.items()},
        "shift": shift_table(lm),
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "analysis.json").write_text(json.dumps(report, indent=1) + "\n")
        plot(report, out / "analysis.png", title=title)
    return report


def plot(report: dict, path: str | Path, *, title: str | None = None) -> Path:
    """Heatmaps: prefix-matching and previous-token scores (layer x head), and the shift's
    current-token taps alpha1, beta1 (layer x KV head)."""
    plt = pyplot()
    panels = [("prefix_matching", "prefix matching (induction)"), ("previous_token", "previous token")]
    mats = [(torch.tensor(report["scores"][k]), t, (0.0, 1.0)) for k, t in panels]
    alpha1 = torch.tensor([[row[0] for row in layer["alpha"]] for layer in report["shift"]])
    beta1 = torch.tensor([[row[0] for row in layer["beta"]] for layer in report["shift"]])
    lim = float(max(1.0, alpha1.abs().max(), beta1.abs().max()))
    mats += [(alpha1, "α1 (key: current-token tap)", (-lim, lim)), (beta1, "β1 (value: current-token tap)", (-lim, lim))]
    L = mats[0][0].shape[0]
    fig, axes = plt.subplots(1, 4, figsize=(16, 1.2 + 0.45 * max(L, 2)), squeeze=False)
    for ax, (m, t, (lo, hi)) in zip(axes[0], mats):
        im = ax.imshow(m.numpy(), vmin=lo, vmax=hi, cmap="viridis" if lo == 0 else "coolwarm", aspect="auto")
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("head" if "α" not in t and "β" not in t else "KV head")
        ax.set_ylabel("layer")
        ax.set_yticks(range(m.shape[0]))
        ax.set_xticks(range(m.shape[1]))
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title or f"head analysis (repeated random tokens, n={report['n']})", fontsize=10)
    return save_figure(fig, path, dpi=110)


def load_for_analysis(path: str | Path) -> LM:
    """kvshift.LM from a KVShiftForCausalLM directory or a training run/checkpoint directory."""
    # transformers is optional (the hf extra); importing kvshift.hf registers KVShiftForCausalLM with it
    from transformers import AutoModelForCausalLM

    from kvshift.hf import load_training_checkpoint, resolve_model_dir
    from kvshift.hf.modeling import load_lm_state

    path = Path(path)
    kind, _ = resolve_model_dir(path)
    if kind == "hf":
        mt = json.loads((path / "config.json").read_text())["model_type"]
        if mt != "kvshift":
            raise ValueError(f"{path}: model_type {mt!r}; head analysis needs a kvshift model "
                             f"(convert a Llama first with `kvshift convert-llama`)")
        return AutoModelForCausalLM.from_pretrained(str(path)).model.eval()
    mc, state, _ = load_training_checkpoint(path)
    lm = LM(mc, seed=None)
    load_lm_state(lm, state)
    return lm.eval()
