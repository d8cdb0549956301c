"""Plots and README of the language-model experiments' results directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvshift.experiments.lm.spec import PAIR
from kvshift.experiments.lm.stats import fmt
from kvshift.train.plot import curves
from kvshift.utils.plot import pyplot, save_figure


def plot_parts(out: Path, stats: dict, name: str, scale: str) -> None:
    plt = pyplot()
    n = len(stats)
    fig, axes = plt.subplots(2, n, figsize=(4.6 * n + 1, 7.5), squeeze=False)
    for j, (pname, st) in enumerate(stats.items()):
        ax, ax2 = axes[0][j], axes[1][j]
        base = st["baseline"]
        for i, arm in enumerate(st["arms"]):
            for k, (seed, r) in enumerate(sorted(st["runs"][arm].items())):
                v = curves(out / r["run_dir"])["val"]
                if v:
                    ax.plot(*zip(*v), "-", lw=1.2, color=f"C{i}", alpha=1.0 if k == 0 else 0.5,
                            label=arm if k == 0 else None)
                b = st["runs"][base].get(seed)
                if arm != base and b and v:
                    bv, av = dict(curves(out / b["run_dir"])["val"]), dict(v)
                    xs = sorted(set(bv) & set(av))
                    ax2.plot(xs, [av[x] - bv[x] for x in xs], "-", color=f"C{i}", alpha=1.0 if k == 0 else 0.5,
                             label=f"{arm} − {base}" if k == 0 else None)
        ax.set(title=f"{name} {pname}", xlabel="tokens", ylabel="validation loss (nats/token)")
        ys = [y for a in st["runs"].values() for r in a.values() for _, y in curves(out / r["run_dir"])["val"]]
        if ys:
            ax.set_ylim(min(ys) - 0.05, min(max(ys), min(ys) + 2.5))
        ax2.axhline(0, color="k", lw=0.8)
        ax2.set(xlabel="tokens", ylabel="val loss − baseline")
        for a in (ax, ax2):
            a.grid(alpha=0.3)
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=7)
    fig.suptitle(f"{name} ({scale} scale)")
    save_figure(fig, out / "plot.png", dpi=110)
    if name == "lm-scaling":
        _plot_scaling(out, stats)


def _plot_scaling(out: Path, stats: dict) -> None:
    s = json.loads((out / "summary.json").read_text())
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, a in enumerate(PAIR):
        pts = sorted((v[a]["params"], v[a]["val_loss"]) for v in s.get("sizes", {}).values() if v[a]["val_loss"])
        if pts:
            ax.plot(*zip(*pts), "o", color=f"C{i}", label=a)
        f = s.get("fits", {}).get(a, {}).get("log_linear")
        if f and pts:
            xs = np.geomspace(pts[0][0], pts[-1][0], 50)
            ax.plot(xs, f["a"] * xs ** -f["b"] + f["c"], "--", color=f"C{i}", lw=1,
                    label=f"{a}: {f['a']:.3g}·N^-{f['b']:.3f}")
    ax.set(xscale="log", xlabel="non-embedding parameters", ylabel="final validation loss", title="lm-scaling")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, out / "scaling.png", dpi=110)


def plot_coefficients(out: Path, res: dict) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    labels = {"alpha1": "α1 (key, current)", "alpha2": "α2 (key, previous)", "beta1": "β1 (value, current)",
              "beta2": "β2 (value, previous)"}
    for ax, (k, lab) in zip(axes, labels.items()):
        for tag, color in (("early", "C7"), ("final", "C3")):
            ax.hist(res[tag]["values"][k], bins=30, alpha=0.6, color=color, label=f"{tag} (step {res[tag]['step']})")
        ax.axvline(0, color="k", lw=0.6)
        ax.axvline(1, color="k", lw=0.6)
        ax.set(title=lab, xlabel="value", ylabel="KV heads")
        ax.legend(fontsize=7)
    save_figure(fig, out / "plot.png", dpi=110)


def _a_run_dir(st: dict) -> str:
    return next(iter(next(iter(st["runs"].values())).values()))["run_dir"]


def _readme_tables(s: dict, out: Path) -> str:
    lines = []
    for pname, st in s.get("parts", {}).items():
        cfg = json.loads((out / _a_run_dir(st) / "config.json").read_text())
        m, o, t, d = cfg["model_config"], cfg["optim"], cfg["train"], cfg["data"]
        lines += [f"### {pname}", "",
                  f"Model d {m['dim']}, {m['n_layers']} layers, {m['n_heads']} heads / {m['n_kv_heads']} KV heads, "
                  f"ffn {m['ffn_dim']}, vocab {m['vocab_size']}; batch {d['batch_size']} × {d['seq_len']}, "
                  f"{t['steps']} steps, AdamW {tuple(o['betas'])}, wd {o['weight_decay']}, lr {o['lr']} "
                  f"({o['warmup']} warm-up steps, then constant), clip {o['clip']}; val loss every {t['eval_every']} "
                  f"steps on {t['eval_batches']} batches.", "",
                  "| arm | seed | non-emb. params | tokens | epochs | final val loss | Δ vs baseline | speed-up | "
                  "below baseline | tokens/s | diverged |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for arm in st["arms"]:
            for seed, r in sorted(st["runs"][arm].items()):
                ps = st["per_seed"].get(seed, {}).get(arm, {})
                lines.append(
                    f"| {arm} | {seed} | {r['non_embedding_params']:,} | {r['tokens']:,} | {fmt(r['epochs'], '.2f')} | "
                    f"{fmt(r['final_val_loss'])} | {fmt(ps.get('diff'), '+.4f')} | {fmt(ps.get('speedup'), '.2f')} | "
                    f"{fmt(ps.get('below_fraction'), '.0%')} | {fmt(r['tokens_per_s'], ',.0f')} | "
                    f"{'step ' + str(r['diverged_step']) if r['diverged'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


PAIR_NOTE = """Both arms of a pair share the initial weights (train.seed) and the batches (data.seed); speed-up = tokens
vanilla needs to reach its final val loss ÷ tokens the arm needs to reach that loss (linear interpolation
of the validation curve); "below baseline" = share of evaluations past the first 10% of tokens at which
the arm's val loss is below the baseline's. Epochs count passes over the unique training tokens.
"""


def write_readme(out: Path, s: dict) -> None:
    if s["experiment"] == "shift-coefficients":
        rows = ["| checkpoint | step | (a1>a2, b1>b2) | (a1>a2, b1<=b2) | (a1<=a2, b1>b2) | (a1<=a2, b1<=b2) | diagonal | "
                "outside [0,1] (α1, α2, β1, β2) |", "|---|---|---|---|---|---|---|---|"]
        for tag, r in s["checkpoints"].items():
            c, o = r["counts"], r["outside_0_1"]
            rows.append(f"| {tag} | {r['step']} | {c['a1>a2,b1>b2']} | {c['a1>a2,b1<=b2']} | {c['a1<=a2,b1>b2']} | "
                        f"{c['a1<=a2,b1<=b2']} | {r['diagonal_fraction']:.0%} | {o['alpha1']}, {o['alpha2']}, "
                        f"{o['beta1']}, {o['beta2']} |")
        body = (f"Source: `{s['source']}` (coefficients read from its checkpoints; the early one is the first, "
                "at ~10% of training). α1/β1 multiply the current token's key/value, α2/β2 the previous token's. "
                "The paper's init draws α and β independently (α1 = r, α2 = 1 − r), so about half the heads start "
                "on the diagonal.\n\n" + "\n".join(rows) + "\n")
    else:
        body = PAIR_NOTE + "\n" + _readme_tables(s, out)
        if s.get("fits"):
            body += "Power-law fits (least squares; log-linear L = a·N^-b on log L; with ≥ 4 sizes also L = a·N^-b + c, " \
                    "c on a grid, which has only n − 3 degrees of freedom):\n\n" + "\n".join(
                        f"- {a}: " + "; ".join(f"{f['form']}: a={f['a']:.4g}, b={f['b']:.4f}, c={f['c']:.4f}, "
                                               f"rmse {f['rmse']:.4f}" for f in v.values()) for a, v in s["fits"].items()) + "\n"
    text = f"""# {s['experiment']} ({s['scale']} scale)

Commands: `{s['command']}`
Commit: `{s['git_commit']}` · device: {s['device']} · torch {s['torch']} · summarised by `{s['summarized_by']}`

**Paper:** {s['paper']}

**Ours:** **{s['verdict']}** — {s['verdict_text']}

{body}
![plot](plot.png)
"""
    (out / "README.md").write_text(text)


# ---- registry and CLI -----------------------------------------------------------------------------
