"""Per-mixer probes of KV shifting's family (beyond the paper): each member of the family of short causal mixers
(`ModelConfig.mixer`: dconv, canon, keyoffset, smear, beside vanilla attention) against vanilla and KV shift on
the two synthetic tasks where one token of look-back matters.

    family-induction  1-layer models at toy.INDUCTION's setting: steps to 90% induction accuracy, same data,
                      init, steps and optimiser for every arm (toy.run_arms; runs published per (arm, seed))
    family-hopk       hop-k without adjacent repeats (hopk.HOPK["norepeat"]: learned positions, GELU) at L = 4:
                      hops solved per arm (hopk.train_runs; runs published per (depth, arm, seed))
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

from kvshift.experiments import hopk, toy, toy_runs
from kvshift.experiments.arms import Arm
from kvshift.experiments.base import Experiment, ResultsLog, RunOptions, write_summary
from kvshift.experiments.toy_report import plot_accuracy, write_readme
from kvshift.utils.io import read_json, read_jsonl
from kvshift.utils.plot import pyplot, save_figure
from kvshift.utils.provenance import command_line

# arm -> model options: vanilla attention with one mixer each, beside vanilla and KV shift
MEMBERS = {"vanilla": {"attention": "vanilla"}, "kvshift": {"attention": "kvshift"},
           "dconv": {"attention": "vanilla", "mixer": "dconv"}, "canon": {"attention": "vanilla", "mixer": "canon"},
           "keyoffset": {"attention": "vanilla", "mixer": "keyoffset"},
           "smear": {"attention": "vanilla", "mixer": "smear"}}
RIVALS = ("dconv", "canon", "keyoffset", "smear")
SEEDS = (0, 1, 2)
SPEED_MARGIN = 0.8  # a member is faster than KV shift when its median steps to 90% are below 0.8x KV shift's


def _with_default_seeds(opts: RunOptions) -> RunOptions:
    return opts if opts.seeds is not None else dataclasses.replace(opts, seeds=list(SEEDS))


# ---- family-induction ---------------------------------------------------------------------------------
IND_PAPER = ("Beyond the paper: KV shifting lets one layer form an induction head (Fig. 1a). Every short causal "
             "mixer that shows a layer the previous token's key can do the same; which learns it fastest?")


def induction_arms(scale: str) -> list[Arm]:
    s = toy.INDUCTION[scale]
    arms = []
    for name, m in MEMBERS.items():
        cfg = toy._cfg(s, m["attention"], 1, **{k: v for k, v in m.items() if k != "attention"})
        arms.append(Arm(f"{name}-1L", dataclasses.replace(cfg, name=f"{name}-1L")))
    return arms


def median_steps(per_seed: dict) -> float:
    """Median over seeds of the steps to a threshold, a seed that never reached it counting as infinite (the
    upper median for an even count)."""
    v = sorted(math.inf if x is None else x for x in per_seed.values())
    return v[len(v) // 2] if v else math.inf


def induction_verdict(arms: dict) -> tuple[str, str, dict]:
    """arms: the toy summary's per-arm aggregate (steps_to['0.9']['per_seed'])."""
    med = {a: median_steps(r["steps_to"]["0.9"]["per_seed"]) for a, r in arms.items()}
    show = lambda a: "never" if med[a] == math.inf else f"{med[a]:.0f}"  # noqa: E731
    fin = lambda a: f", final {arms[a]['final_accuracy']:.1%}" if "final_accuracy" in arms[a] else ""  # noqa: E731
    text = ("median steps to 90% induction accuracy (1 layer): " + ", ".join(
        f"{a.removesuffix('-1L')} {show(a)} ({arms[a]['steps_to']['0.9']['reached']} seeds{fin(a)})" for a in arms))
    extra = {"median_steps_to_90": {a: (None if v == math.inf else v) for a, v in med.items()}}
    need = ["kvshift-1L", *(f"{r}-1L" for r in RIVALS)]
    if any(a not in arms or len(arms[a]["seeds"]) < 2 for a in need):
        return "inconclusive", text + "; fewer than 2 seeds of KV shift or of some member.", extra
    if all(med[a] == math.inf for a in need):
        return "inconclusive", text + "; no arm reached 90%: the budget cannot rank them.", extra
    kv = med["kvshift-1L"]
    faster = [a.removesuffix("-1L") for a in need[1:] if med[a] < SPEED_MARGIN * kv]
    text += "; faster than KV shift by > 20%: " + (", ".join(faster) or "none")
    extra["faster_than_kvshift"] = faster
    if "vanilla-1L" in med and med["vanilla-1L"] < math.inf:  # the control learned: the probe ranks nothing
        return "inconclusive", text + "; vanilla 1-layer reached 90% too, so the task does not need a mixer.", extra
    every = arms["kvshift-1L"]["steps_to"]["0.9"]["reached"].split("/")
    if kv == math.inf:
        return "not reproduced", text + ".", extra
    if not faster and every[0] == every[1]:
        return "reproduced", text + ".", extra
    return "partly reproduced", text + ".", extra


# induction-depth trains vanilla-1L and kvshift-1L on this very task, data stream and evaluation set: its runs
# of the same setting (same device kind) are copied instead of trained again
IND_SOURCES = ("induction-depth",)


def family_induction(opts: RunOptions, out: Path) -> dict:
    opts = _with_default_seeds(opts)
    s = toy.INDUCTION[opts.scale]
    summ = toy.run_arms("family-induction", induction_arms(opts.scale), toy._induction_sampler(s),
                        # one thread at cpu scale, as hop-k's cpu setting (spinning threads on shared cores)
                        toy._spec(s, opts.steps, threads=1 if opts.scale == "cpu" else None), s["n_eval"],
                        opts=opts, out=out, paper=IND_PAPER, sources=IND_SOURCES)
    return _finish_induction(summ, out)


def _finish_induction(summ: dict, out: Path) -> dict:
    summ["verdict"], summ["verdict_text"], extra = induction_verdict(summ["arms"])
    summ.update(extra)
    write_summary(out, summ)
    plot_accuracy(out, f"Induction, 1 layer per family member ({summ['scale']} scale)", list(summ["arms"]), log_x=True)
    write_readme(out, summ, "Induction with one layer, per family member (beyond the paper)",
                 f"**{summ['verdict']}** — {summ['verdict_text']}",
                 "Every arm is a 1-layer model of toy.INDUCTION's setting (RoPE, SwiGLU, tied embeddings); the mixer "
                 "arms use vanilla attention plus the mixer. Starting points differ by design: dconv, Canon and smear "
                 "start as the vanilla model (identity or zero mixing) and must learn to mix; KV shift starts from the "
                 "paper's random coefficients (already mixing); key offset is fixed from step 0. Rule: " + IND_RULE)
    return summ


def _summarize_induction(opts: RunOptions, out: Path) -> dict:
    return _finish_induction(toy.summarize_runs("family-induction", opts, out, IND_PAPER), out)


IND_RULE = ("median over seeds of the steps to 90% held-out induction accuracy per 1-layer arm (a seed that never "
            "gets there counts as never); reproduced: KV shift reaches 90% in every seed and no member (dconv, "
            "canon, keyoffset, smear) gets there in fewer than 0.8× KV shift's steps; partly: KV shift reaches it "
            "(median) but a member is faster or a seed misses; not reproduced: KV shift's median never reaches it; "
            "inconclusive: fewer than 2 seeds per arm, or no arm reaches 90%.")


# ---- family-hopk --------------------------------------------------------------------------------------
FAMILY_HOPK = {"gpu": dict(hopk.HOPK["norepeat"]["gpu"], depths=(4,)),
               "cpu": dict(hopk.HOPK["norepeat"]["cpu"], depths=(2, 4))}
# hopk-norepeat's setting but for its depths: its vanilla and kvshift runs at a shared depth are copied
HOPK_SOURCES = ("hopk-norepeat",)
HOPK_PAPER = ("Beyond the paper: App. H shows KV shift solving more hops than vanilla at L = 5; here every member of "
              "the family at L = 4, the paper's hop-k setting (no adjacent repeats, learned positions, GELU).")


def family_hopk(opts: RunOptions, out: Path) -> dict:
    opts = _with_default_seeds(opts)
    s = FAMILY_HOPK[opts.scale]
    depths = [L for L in s["depths"] if not opts.only or str(L) in opts.only]
    if opts.only and not depths:
        raise ValueError(f"--only: depths of family-hopk are {list(s['depths'])}, got {opts.only}")
    if opts.arms and set(opts.arms) - set(MEMBERS):
        raise ValueError(f"--arms: family-hopk has arms {list(MEMBERS)}, got {sorted(set(opts.arms) - set(MEMBERS))}")
    arms = {a: m for a, m in MEMBERS.items() if not opts.arms or a in opts.arms}
    hopk.train_runs("family-hopk", s, opts, out, arms, depths, sources=HOPK_SOURCES)
    return summarize_hopk(opts, out)


def hopk_table(runs: list[dict], max_hops: int) -> dict:
    """depth -> arm -> seed-mean error by k, hops solved (seed-mean curve and per seed), mean error k >= 8."""
    out = {}
    for L in sorted({r["depth"] for r in runs}):
        out[str(L)] = {}
        for a in MEMBERS:
            rows = [r for r in runs if r["depth"] == L and r["arm"] == a]
            if not rows:
                continue
            e = [statistics.fmean(r["final"]["error_by_k"][k] for r in rows) for k in range(max_hops + 1)]
            out[str(L)][a] = {"error_by_k": e, "hops_solved": hopk.hops_solved(e),
                              "hops_solved_per_seed": {str(r["seed"]): hopk.hops_solved(r["final"]["error_by_k"])
                                                       for r in rows},
                              "mean_error_k_ge_8": statistics.fmean(e[8:]), "seeds": len(rows),
                              "non_embedding_params": rows[0]["non_embedding_params"]}
    return out


def hopk_family_verdict(d: dict, max_hops: int) -> tuple[str, str]:
    """d: arm -> hopk_table row at one depth."""
    text = "hops solved (error ≤ 0.05 for every k' ≤ k, seed-mean curve; per seed): " + ", ".join(
        f"{a} {r['hops_solved']} ({'/'.join(map(str, r['hops_solved_per_seed'].values()))})" for a, r in d.items())
    need = ("vanilla", "kvshift", *RIVALS)
    if any(a not in d or d[a]["seeds"] < 2 for a in need):
        return "inconclusive", text + "; fewer than 2 seeds of vanilla, KV shift or some member."
    solved = {a: d[a]["hops_solved"] for a in need}
    if max(solved.values()) < 0:
        return "inconclusive", text + "; no arm solves even k = 0: the budget learned nothing."
    if min(solved.values()) == max_hops:
        return "inconclusive", text + f"; every arm solves all {max_hops} hops: the probe cannot rank them."
    if max(solved.values()) < MIN_HOPS_TO_RANK:
        return "inconclusive", text + (f"; no arm solves {MIN_HOPS_TO_RANK} hops: the budget learned too little "
                                       "to rank the members.")
    per = {a: d[a]["hops_solved_per_seed"] for a in need}
    # a member beats KV shift only when it solves more hops in every seed (paired), not on the seed mean alone
    more = [a for a in RIVALS if all(per[a][k] > per["kvshift"][k] for k in per["kvshift"] if k in per[a])]
    higher_mean = [a for a in RIVALS if solved[a] > solved["kvshift"]]
    text += ("; members solving more hops than KV shift in every seed: " + (", ".join(more) or "none")
             + "; with more on the seed-mean curve: " + (", ".join(higher_mean) or "none") + ".")
    if not more and not higher_mean:
        return "reproduced", text
    beats_vanilla = all(per["kvshift"][k] > per["vanilla"][k] for k in per["kvshift"] if k in per["vanilla"])
    if not more or beats_vanilla:
        return "partly reproduced", text
    return "not reproduced", text


def summarize_hopk(opts: RunOptions, out: Path) -> dict:
    s = FAMILY_HOPK[opts.scale]
    runs = [json.loads(f.read_text()) for f in sorted((out / "runs").glob("L*/*-s*.json"))]
    if not runs:
        raise ValueError(f"{out}: no published runs of family-hopk yet")
    log = ResultsLog(out)
    for f in sorted((out / "runs").glob("L*/*-s*.metrics.jsonl")):
        arm, seed = f.name.split(".")[0].rsplit("-s", 1)
        for x in read_jsonl(f):
            log.log({**x, "arm": arm, "seed": int(seed), "depth": int(f.parent.name[1:])})
    log.close()
    table = hopk_table(runs, s["max_hops"])
    deepest = max(int(L) for L in table)
    verdict, text = hopk_family_verdict(table[str(deepest)], s["max_hops"])
    first = runs[0]
    prov = toy_runs.merged_provenance(runs)
    summ = {"experiment": "family-hopk", "scale": opts.scale, "paper": HOPK_PAPER, **prov,
            "summarized_by": command_line(), "verdict": verdict, "verdict_text": f"At L = {deepest}, {text}",
            "train": first["train"], "task": {k: s[k] for k in ("alphabet", "max_hops", "seq", "no_adjacent_repeats")},
            "model": s["model"], "depths": [int(L) for L in table], "seeds": len({r["seed"] for r in runs}),
            "by_depth": table, "wall_seconds": sum(r["wall_seconds"] for r in runs)}
    write_summary(out, summ)
    _plot_hopk(out, summ)
    _hopk_readme(out, summ)
    return summ


def _plot_hopk(out: Path, summ: dict) -> None:
    plt = pyplot()
    depths = summ["depths"]
    fig, axes = plt.subplots(1, len(depths), figsize=(5.5 * len(depths), 4.2), squeeze=False)
    for j, L in enumerate(depths):
        ax = axes[0][j]
        for i, (a, r) in enumerate(summ["by_depth"][str(L)].items()):
            ax.plot(range(len(r["error_by_k"])), r["error_by_k"], "o-", ms=3, color=f"C{i}",
                    label=f"{a} (solves {r['hops_solved']})")
        ax.set(title=f"L = {L}", xlabel="hops k", ylabel="error rate (seed mean)", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"family-hopk ({summ['scale']} scale), {summ['seeds']} seed(s)")
    save_figure(fig, out / "plot.png", dpi=100)


def _hopk_readme(out: Path, s: dict) -> None:
    t, n = s["train"], s["task"]["max_hops"] + 1
    rows = ["| L | arm | non-emb. params | " + " | ".join(f"k={k}" for k in range(n)) + " | mean k≥8 | hops solved "
            "(per seed) |", "|" + "---|" * (n + 5)]
    for L in s["depths"]:
        for a, r in s["by_depth"][str(L)].items():
            rows.append(f"| {L} | {a} | {r['non_embedding_params']:,} | " + " | ".join(f"{v:.2f}" for v in r["error_by_k"])
                        + f" | {r['mean_error_k_ge_8']:.3f} | {r['hops_solved']} "
                        f"({'/'.join(map(str, r['hops_solved_per_seed'].values()))}) |")
    (out / "README.md").write_text(f"""# hop-k per family member (beyond the paper)

Command: `{s['command']}`
Commit: `{s['git_commit']}` · device: {s['device']} · torch {s['torch']} · wall {s['wall_seconds']:.0f} s

**Question:** {s['paper']}

**Setting:** hop-k over an alphabet of {s['task']['alphabet']}, no adjacent repeats, length {s['task']['seq']},
hop counts 0..{s['task']['max_hops']}; model options {s['model']}; the mixer arms use vanilla attention plus the mixer.
{t['steps']} steps, batch {t['batch_size']}, lr {t['lr']} ({t['warmup']} warm-up steps, then constant); every arm
of a seed sees the same data stream from the same shared initial weights; seeds: {s['seeds']}.

**Ours:** **{s['verdict']}** — {s['verdict_text']}

**Rule:** {HOPK_RULE}

Error rate by k (seed mean):

{chr(10).join(rows)}

![plot](plot.png)
""")


MIN_HOPS_TO_RANK = 2  # the best arm must solve hops 0..2 before a difference of a hop means anything
HOPK_RULE = ("hops solved = the largest k with error ≤ 0.05 at every k' ≤ k, per seed and on the seed-mean curve, at "
             "the deepest depth (L = 4); reproduced: KV shift solves at least as many hops as every member (dconv, "
             "canon, keyoffset, smear) on the seed-mean curve and no member solves more in every seed; partly: a "
             "member solves more on the mean only (the seeds disagree), or in every seed while KV shift solves more "
             "than vanilla in every seed; not reproduced: a member solves more in every seed and KV shift does not "
             "beat vanilla in every seed; inconclusive: fewer than 2 seeds per arm, every arm solves every hop, or no "
             f"arm solves {MIN_HOPS_TO_RANK} hops (too little learned to rank).")


def _resummarize_induction(opts: RunOptions, out: Path) -> dict:
    if toy_runs.has_runs(out):
        return _summarize_induction(opts, out)
    return _finish_induction(read_json(out / "summary.json"), out)


EXPERIMENTS = [
    Experiment("family-induction", "Family (beyond the paper)",
               "With one layer, KV shifting learns induction at least as fast as every other member of its family.",
               IND_RULE, "1-layer induction per family member: vanilla, KV shift, dconv, canon, keyoffset, smear",
               family_induction, summarize=_resummarize_induction, options=("arms", "runs")),
    Experiment("family-hopk", "Family (beyond the paper)",
               "At L = 4 on hop-k, KV shifting solves at least as many hops as every other member of its family.",
               HOPK_RULE, "hop-k at L = 4 per family member (no adjacent repeats, learned positions)", family_hopk,
               summarize=summarize_hopk, options=("only", "arms", "runs")),
]
