"""shift-coupling: do KV-shift heads take key and value from the same token (paper Table 4), tested directly?

Table 4 counts KV heads by (α1 > α2) × (β1 > β2) at the end of training; a dominant diagonal means the key
and the value of a head lean the same way. With the paper's init (α and β drawn independently) about half
the heads start on the diagonal, so a final count mixes what training did with where heads started. Here
each ~10M model trains once from the paper's init and once with every head on the quadrant boundary
(α = β = (0.5, 0.5)), three seeds each; the coefficients of every head are recorded at step 0 and at every
evaluation. Under independence of the key and value sides a head lands on the diagonal with probability
1/2: a one-sided binomial test over all heads of all seeds. Ties (α1 = α2) count as "≤", like Table 4.
"""

from __future__ import annotations

import math
from pathlib import Path

from kvshift.experiments.base import RunOptions, write_summary
from kvshift.experiments.lm.spec import parts
from kvshift.experiments.lm.stats import coefficient_table, published_runs, summary_provenance
from kvshift.train.metrics import read_metrics
from kvshift.utils.plot import pyplot, save_figure

MIN_HEADS = 100  # below this a one-sided 5% binomial test cannot see the paper's diagonal share (0.80) reliably
PAPER = ("Table 4 (2.9B, 128 KV heads): (a1>a2, b1>b2) 50, (a1>a2, b1<=b2) 17, (a1<=a2, b1>b2) 9, (a1<=a2, b1<=b2) 52: "
         "the diagonal dominates (key and value from the same token).")


def quadrants(layers: list[dict]) -> list[tuple[bool, bool]]:
    """(α1 > α2, β1 > β2) of every KV head of every layer, in order."""
    return [(a[0] > a[1], b[0] > b[1]) for layer in layers for a, b in zip(layer["alpha"], layer["beta"])]


def binomial_p(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def trajectory(run_dir: Path) -> list[dict]:
    """The coefficient records of a run, by step."""
    return sorted((r for r in read_metrics(run_dir / "metrics.jsonl") if "coefficients" in r), key=lambda r: r["step"])


def init_stats(runs: dict[int, Path]) -> dict:
    finals, per_seed, moved_init, moved_early, curve = [], {}, 0, 0, {}
    for seed, rd in sorted(runs.items()):
        recs = trajectory(rd)
        if len(recs) < 3:
            raise ValueError(f"{rd}: needs coefficients at step 0, an early evaluation and the end")
        q0, q1, qf = (quadrants(r["coefficients"]) for r in (recs[0], recs[1], recs[-1]))
        moved_init += sum(a != b for a, b in zip(q0, qf))
        moved_early += sum(a != b for a, b in zip(q1, qf))
        t = coefficient_table(recs[-1]["coefficients"])
        per_seed[str(seed)] = {"step": recs[-1]["step"], **t}
        finals.append(t)
        for r in recs:
            q = quadrants(r["coefficients"])
            curve.setdefault(r["step"], []).append(sum(a == b for a, b in q) / len(q))
    counts = {k: sum(t["counts"][k] for t in finals) for k in finals[0]["counts"]}
    n = sum(counts.values())
    diag = counts["a1>a2,b1>b2"] + counts["a1<=a2,b1<=b2"]
    return {"counts": counts, "heads": n, "diagonal": diag, "diagonal_fraction": diag / n, "p_value": binomial_p(diag, n),
            "per_seed": per_seed, "changed_quadrant_since_init": moved_init,
            "changed_quadrant_since_first_eval": moved_early, "first_eval_step": recs[1]["step"],
            "diagonal_by_step": {str(s): v for s, v in sorted(curve.items())}}


def verdict(res: dict) -> tuple[str, str]:
    u, h = res.get("uniform"), res.get("half")
    if not u or not h:
        return "inconclusive", "both inits must run: " + ", ".join(res) + " so far."
    text = "; ".join(
        f"{name} init: diagonal {r['diagonal']}/{r['heads']} = {r['diagonal_fraction']:.0%} (one-sided binomial p = "
        f"{r['p_value']:.2g}; per seed " + ", ".join(f"{v['diagonal_fraction']:.0%}" for v in r["per_seed"].values())
        + f"); {r['changed_quadrant_since_first_eval']} of {r['heads']} heads changed quadrant after step "
        f"{r['first_eval_step']}" for name, r in (("paper", u), ("boundary (0.5, 0.5)", h)))
    if min(u["heads"], h["heads"]) < MIN_HEADS:
        return "inconclusive", text + f". Fewer than {MIN_HEADS} heads per init: too few for the test."
    sig = {k: r["p_value"] < 0.05 and r["diagonal_fraction"] > 0.5 for k, r in res.items()}
    v = "reproduced" if all(sig.values()) else "partly reproduced" if any(sig.values()) else "not reproduced"
    return v, text + "."


def summarize(opts: RunOptions, out: Path) -> dict:
    res, dirs = {}, []
    for p in parts("shift-coupling", opts.scale):
        runs = published_runs(out, p).get("kvshift", {})
        if runs:
            res[p.name] = init_stats(runs)
            dirs += list(runs.values())
    if not res:
        raise ValueError(f"{out}: no finished runs of shift-coupling yet")
    v, text = verdict(res)
    s = {"experiment": "shift-coupling", "scale": opts.scale, "paper": PAPER, "verdict": v, "verdict_text": text,
         **summary_provenance(dirs), "inits": res, "min_heads": MIN_HEADS}
    write_summary(out, s)
    _plot(out, res)
    _readme(out, s)
    return s


def _plot(out: Path, res: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (name, r) in enumerate(res.items()):
        steps = [int(k) for k in r["diagonal_by_step"]]
        vals = list(r["diagonal_by_step"].values())
        mean = [sum(v) / len(v) for v in vals]
        ax.plot(steps, mean, "o-", color=f"C{i}", label=f"{name} init (mean over seeds)")
        ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=f"C{i}", alpha=0.2)
    ax.axhline(0.5, color="k", lw=0.8, ls=":", label="independent sides")
    ax.set(xlabel="step", ylabel="share of KV heads on the diagonal", ylim=(0, 1), title="shift-coupling (Table 4)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, out / "plot.png")


def _readme(out: Path, s: dict) -> None:
    rows = ["| init | heads | (a1>a2, b1>b2) | (a1>a2, b1<=b2) | (a1<=a2, b1>b2) | (a1<=a2, b1<=b2) | diagonal | p |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in s["inits"].items():
        c = r["counts"]
        rows.append(f"| {name} | {r['heads']} | {c['a1>a2,b1>b2']} | {c['a1>a2,b1<=b2']} | {c['a1<=a2,b1>b2']} | "
                    f"{c['a1<=a2,b1<=b2']} | {r['diagonal_fraction']:.0%} | {r['p_value']:.2g} |")
    text = (f"# shift-coupling ({s['scale']} scale)\n\nCommands: `{s['command']}`\nCommit: `{s['git_commit']}` · "
            f"device: {s['device']} · torch {s['torch']}\n\n**Paper:** {s['paper']}\n\n**Ours:** **{s['verdict']}** — "
            f"{s['verdict_text']}\n\n{__doc__.split(chr(10) + chr(10), 1)[1]}\n" + "\n".join(rows) + "\n\n![plot](plot.png)\n")
    (out / "README.md").write_text(text)
