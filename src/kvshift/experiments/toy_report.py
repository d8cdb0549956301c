"""Plots and READMEs of the toy experiments' results directories."""

from __future__ import annotations

from pathlib import Path

from kvshift.utils.io import read_jsonl
from kvshift.utils.plot import pyplot, save_figure


def plot_accuracy(out: str, title: str, arms: list[str], log_x: bool = False) -> None:
    """Accuracy and target loss vs step per arm: the mean over seeds, with the band from the lowest to the
    highest seed where there are several."""
    plt = pyplot()
    recs = [r for r in read_jsonl(Path(out) / "metrics.jsonl") if r.get("eval")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm in arms:
        by_step: dict[int, list[dict]] = {}
        for r in recs:
            if r["arm"] == arm and (r["step"] > 0 or not log_x):
                by_step.setdefault(r["step"], []).append(r)
        steps = sorted(by_step)
        k = len({r["seed"] for v in by_step.values() for r in v})
        for ax, key in zip(axes, ("accuracy", "target_loss")):
            vals = [[r[key] for r in by_step[s]] for s in steps]
            label = (f"{arm} ({k} seed{'s' if k != 1 else ''})" if key == "accuracy" else None)
            line, = ax.plot(steps, [sum(v) / len(v) for v in vals], label=label)
            if any(len(v) > 1 for v in vals):
                ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(), alpha=0.2)
    n_seeds = len({r["seed"] for r in recs})
    axes[0].set(xlabel="step", ylabel="accuracy on targets", ylim=(-0.02, 1.02),
                title=title + (" — mean over seeds, band: min–max" if n_seeds > 1 else ""))
    axes[1].set(xlabel="step", ylabel="loss on targets (nats)", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        if log_x:
            ax.set_xscale("log")
    axes[0].legend()
    save_figure(fig, f"{out}/plot.png", dpi=110)


def _table(summary: dict) -> str:
    rows = ["| arm | non-emb. params | final acc. (per seed) | best acc. | step to 50% | 90% | 99% |", "|---|---|---|---|---|---|---|"]
    for n, a in summary["arms"].items():
        st = a["steps_to"]
        fmt = lambda k: f"{st[k]['median_step']} ({st[k]['reached']})" if st[k]["median_step"] is not None else f"never ({st[k]['reached']})"
        per = ", ".join(f"{v:.3f}" for v in a["final_accuracy_per_seed"])
        rows.append(f"| {n} | {a['non_embedding_params']:,} | {per} | {a['best_accuracy']:.3f} | {fmt('0.5')} | {fmt('0.9')} | {fmt('0.99')} |")
    return "\n".join(rows)


def write_readme(out: str, summary: dict, title: str, verdict: str, notes: str = "") -> None:
    s = summary
    text = f"""# {title}

Command: `{s['command']}`
Commit: `{s['git_commit']}` · device: {s['device']} · torch {s['torch']} · wall {s['wall_seconds']:.0f} s

**Paper:** {s['paper']}

**Setting:** {s['train']['steps']} steps, batch {s['train']['batch_size']}, AdamW β=(0.9, 0.95), wd 0.1, lr {s['train']['lr']} with {s['train']['warmup']} warm-up steps then constant, clip 1, {'bf16 autocast' if s['train'].get('bf16') else 'fp32'}; every arm sees the same data stream and starts from the same shared weights; accuracy on {s['n_eval_sequences']} held-out sequences every {s['train']['eval_every']} steps; seeds: {s['seeds']}.

{_table(s)}

**Verdict:** {verdict}

{notes}

![plot](plot.png)
"""
    (Path(out) / "README.md").write_text(text)


def heads_table(heads: list[dict]) -> str:
    rows = ["| head | α1 | α2 | β1 | β2 | induction-like |", "|---|---|---|---|---|---|"]
    for h in heads:
        rows.append(f"| {h['head']} | {h['alpha1']:.3f} | {h['alpha2']:.3f} | {h['beta1']:.3f} | {h['beta2']:.3f} | "
                    f"{'yes' if h['induction_like'] else 'no'} |")
    return "Final coefficients (seed 0):\n\n" + "\n".join(rows)


def plot_dynamics(out: str, heads: list[dict]) -> None:
    plt = pyplot()
    recs = [r for r in read_jsonl(Path(out) / "metrics.jsonl") if "coefficients" in r and r["seed"] == 0]
    steps = [r["step"] for r in recs]
    fig, axes = plt.subplots(1, 5, figsize=(20, 4))
    names = [("alpha", 0, "α1 (key, current)"), ("alpha", 1, "α2 (key, previous)"),
             ("beta", 0, "β1 (value, current)"), ("beta", 1, "β2 (value, previous)")]
    for ax, (side, j, label) in zip(axes, names):
        for h in heads:
            ys = [r["coefficients"][0][side][h["head"]][j] for r in recs]
            ax.plot(steps, ys, color="C3" if h["induction_like"] else "0.6", lw=1.2 if h["induction_like"] else 0.8)
        ax.set(title=label, xlabel="step")
        ax.grid(alpha=0.3)
    ev = [r for r in read_jsonl(Path(out) / "metrics.jsonl") if r.get("eval") and r["seed"] == 0]
    axes[4].plot([r["step"] for r in ev], [r["accuracy"] for r in ev], color="k")
    axes[4].set(title="induction accuracy", xlabel="step", ylim=(-0.02, 1.02))
    axes[4].grid(alpha=0.3)
    fig.suptitle("KV-shift coefficients per head (red: ends induction-like: α2 > α1 and β1 > β2)")
    save_figure(fig, f"{out}/plot.png", dpi=100)
