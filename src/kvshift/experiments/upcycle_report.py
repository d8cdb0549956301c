"""The upcycle experiment's README and plot (kvshift.experiments.upcycle writes the summary they show)."""

from __future__ import annotations

from pathlib import Path

from kvshift.experiments.base import fmt
from kvshift.utils.io import write_text_atomic


COLORS = {"vanilla": "C0", "kvshift": "C3", "kshift": "C2", "kvshift-fast": "C1"}


def plot(out: Path, runs: dict, baseline: str = "vanilla") -> None:
    """Held-out loss per domain for every arm and seed, and each shifted run's difference from the baseline of
    its seed at the same evaluations (the curves overlap at this scale; the differences are the comparison)."""
    from kvshift.utils.plot import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for ax, dom in zip(axes, ("all", "prose", "code")):
        for arm, by in runs.items():
            for i, (seed, r) in enumerate(sorted(by.items())):
                pts = [(c["tokens"], c[dom]) for c in r["curve"] if c.get(dom) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker=".", color=COLORS[arm], alpha=0.9 if i == 0 else 0.5,
                            label=arm if i == 0 else None)
        ax.set_title(f"held-out loss: {dom}")
        ax.set_xlabel("tokens")
    axes[0].set_ylabel("nats/token")
    axes[0].legend()
    ax = axes[3]
    for arm, by in runs.items():
        for seed, r in sorted(by.items()) if arm != baseline else ():
            base = {c["tokens"]: c["all"] for c in (runs.get(baseline, {}).get(seed) or {}).get("curve", [])}
            pts = [(c["tokens"], c["all"] - base[c["tokens"]]) for c in r["curve"]
                   if c.get("all") is not None and base.get(c["tokens"]) is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", color=COLORS[arm], linestyle="-" if seed == 0 else "--",
                        label=f"{arm} s{seed}")
    ax.axhline(0.0, color="C0", linewidth=0.8)
    ax.set_title(f"all: arm − {baseline} (same seed)")
    ax.set_xlabel("tokens")
    if ax.lines[1:]:
        ax.legend(fontsize=7)
    save_figure(fig, out / "plot.png")


def readme(out: Path, s: dict, rule: str) -> None:
    rates = ", ".join(f"{a} × {m:g}" for a, m in s["arm_shift_lr_mult"].items())
    src = s.get("source_heads")
    hs = s["head_score"]
    lines = [f"# upcycle ({s['scale']})", "", f"**{s['verdict']}** — {s['verdict_text']}", "",
             f"Rule: {rule}", "", f"Shift coefficients: learning rate × {s['shift_lr_mult']:g} ({rates}); a head uses the "
             f"shift when the previous token's share |c2|/(|c1|+|c2|) ≥ {s['moved_share']}. Arms start identical: "
             f"{s['identical_start']}.", "",
             f"Heads (repeated random tokens after BOS; a head counts when its score is ≥ {hs}): induction = prefix "
             f"matching, prev = previous token. Source model before training: "
             + (f"{src['induction_heads']}/{src['heads']} induction heads (max {src['max_prefix_matching']:.3f}), "
                f"{src['previous_token_heads']} previous-token heads." if src else "not analysed.")
             + " Runs without a count were trained before the analysis existed (their checkpoints are gone).", "",
             "Training tokens/s against vanilla of the same seed (each run in its own process, possibly another call or "
             "GPU: indicative only; the controlled cost comparison is `kvshift bench`'s e2e part): "
             + ("; ".join(f"{a} " + ", ".join(f"s{k} {x:.3f}" for k, x in by.items())
                          for a, by in s.get("tokens_per_s_ratio", {}).items() if by) or "—") + ".", "",
             "| arm | seed | start | final (all) | prose | code | tokens | tokens/s | K heads moved | V heads moved "
             "| induction heads (max) | prev heads |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, by in s["runs"].items():
        for seed, r in by.items():
            c = r.get("coefficients") or {}
            f = r["final"] or {}
            h = r.get("heads")
            hcell = f"{h['induction_heads']}/{h['heads']} ({h['max_prefix_matching']:.3f}) | {h['previous_token_heads']}" \
                if h else "— | —"
            lines.append(f"| {arm} | {seed} | {fmt((r['start'] or {}).get('all'))} | {fmt(f.get('all'))} | "
                         f"{fmt(f.get('prose'))} | {fmt(f.get('code'))} | {r['tokens']:,} | {fmt(r['tokens_per_s'], ',.0f')} | "
                         f"{c.get('k_heads_moved', '—')}/{c.get('heads', '—')} | {c.get('v_heads_moved', '—')}/{c.get('heads', '—')} | "
                         f"{hcell} |")
    write_text_atomic(out / "README.md", "\n".join(lines) + "\n")
