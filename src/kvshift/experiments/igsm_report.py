"""Verdict, plot and README of the iGSM results directory (kvshift.experiments.igsm)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from kvshift.tasks import igsm
from kvshift.utils.io import read_jsonl
from kvshift.utils.plot import pyplot, save_figure

ARMS = ("vanilla", "kvshift")
PAPER_SETTINGS = ("Tr12-Te15", "Tr21-Te24")


ID_LEARNED, MIN_SEEDS = 0.8, 2  # in-distribution answer accuracy every run needs, seeds a setting needs
RISING = 0.005  # held-out token accuracy gained over a run's last third that counts as still learning


def late_gain(records: list[dict]) -> float | None:
    """Held-out solution-token accuracy (teacher forced) a run gained over the last third of its training: its
    last evaluation minus the first one at or after two thirds of its last evaluated step; None when no
    evaluation but the last lies in that third."""
    ev = sorted((r["step"], r["solution_token_accuracy"]) for r in records if "solution_token_accuracy" in r)
    late = [a for step, a in ev[:-1] if step >= 2 * ev[-1][0] / 3] if ev else []
    return ev[-1][1] - late[0] if late else None


def ood_difference(r: dict, part: str = "test") -> dict | None:
    """KV shift − vanilla answer accuracy (part "test", the longer problems, or "in_distribution") over the seeds
    both arms ran: per seed, the mean, its SE."""
    kv, va = (r["arms"][a][f"{part}_answer_accuracy_per_seed"] for a in ("kvshift", "vanilla"))
    seeds = sorted(set(kv) & set(va), key=int)
    if not seeds:
        return None
    n = r["n_test"] if part == "test" else r["n_in_distribution"]
    var = sum(kv[x] * (1 - kv[x]) + va[x] * (1 - va[x]) for x in seeds) / n
    diffs = [kv[x] - va[x] for x in seeds]  # SE: the larger of the binomial one and the seed-to-seed one
    between = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return {"seeds": seeds, "per_seed": dict(zip(seeds, diffs)), "mean": sum(diffs) / len(diffs),
            "se": max(math.sqrt(var) / len(seeds), between, 1e-9), "kvshift_mean": sum(kv[x] for x in seeds) / len(seeds)}


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-0.000", "+0.000")


def _convergence(arms: dict, longer: str | None) -> str:
    """What the runs of a setting below the bar say about the budget that would reach it."""
    gains = [g for a in ARMS for g in arms[a].get("test_solution_token_accuracy_late_gain_per_seed", {}).values()]
    text = ""
    if gains:
        rising = sum(g > RISING for g in gains)
        lo, hi = _signed(min(gains)), _signed(max(gains))
        text = (f"; held-out solution-token accuracy still rose over the last third of training in {rising} of "
                f"{len(gains)} runs ({lo if lo == hi else f'{lo} to {hi}'})")
        text += (": no run had converged, so a longer budget may reach the bar" if rising == len(gains) else
                 ": the runs had levelled off, so more steps alone are unlikely to reach it" if not rising else "")
    return text + (f"; the next budget in this scale's plan, {longer}, has not run" if longer else
                   "; what budget reaches the bar is not known from these runs")


def igsm_verdict(results: dict, longer: dict | None = None) -> tuple[str, str]:
    """A setting decides only when every run of both arms reached ID_LEARNED in-distribution answer accuracy,
    over >= MIN_SEEDS seeds both arms ran. In a deciding setting KV shift wins when its mean test answer accuracy
    beats vanilla's by more than two standard errors of the mean difference (the larger of the binomial
    and the seed-to-seed one), above chance.
    'reproduced': every deciding setting won and one is the paper's own; 'partly': some won (or only a smaller
    split did); 'not reproduced': none did; 'inconclusive': no setting decides. longer: per setting, the longer
    budget of the same split that the scale's plan holds and no run used yet (named where a setting is below
    the bar)."""
    parts, decided = [], {}
    for key, r in results.items():
        arms = r["arms"]
        budget = f"{r['steps']} steps × batch {r['batch_size']}"
        if set(arms) != set(ARMS):
            parts.append(f"{key}: only {', '.join(arms)} ran ({budget}); nothing to compare")
            continue
        ind = {a: arms[a]["in_distribution_answer_accuracy_per_seed"] for a in ARMS}
        id_text = "; ".join(f"{a} " + ", ".join(f"s{x} {v:.3f}" for x, v in ind[a].items()) for a in ARMS)
        d = ood_difference(r)
        ood = "; ".join(f"{a} " + ", ".join(f"s{x} {v:.3f}" for x, v in arms[a]["test_answer_accuracy_per_seed"]
                                             .items()) for a in ARMS)
        text = (f"{key} ({budget}, {r['n_test']} test problems per seed): in-distribution answer accuracy {id_text}; "
                f"test (Te{r['test_operations']}) answer accuracy {ood}")
        if d is not None:
            text += (f"; KV shift − vanilla {d['mean']:+.3f} ± {d['se']:.3f} (SE: the larger of the binomial and the "
                     f"seed-to-seed one, {len(d['seeds'])} seed(s))")
        learned = min(min(v.values()) for v in ind.values()) >= ID_LEARNED
        if not learned:
            text += (f" — inconclusive here: not every run reached {ID_LEARNED:.0%} in-distribution answer "
                     f"accuracy within {budget} ({r['steps'] * r['batch_size']:,} training rows), so out-of-distribution "
                     "accuracy tests nothing")
            text += _convergence(arms, (longer or {}).get(key))
            i = ood_difference(r, "in_distribution")
            if i is not None and abs(i["mean"]) > 2 * i["se"]:  # what the run did show: how fast each arm learned
                text += (f". At this budget the arms learned the training distribution unequally: in-distribution "
                         f"KV shift − vanilla {i['mean']:+.3f} ± {i['se']:.3f} ({r['n_in_distribution']} problems, "
                         f"{len(i['seeds'])} seed(s)")
                text += ("), a difference in learning speed, not the paper's claim" if len(i["seeds"]) >= MIN_SEEDS
                         else "; the SE is the test sample's only: how much runs of other seeds differ is not yet "
                              "measured), not the paper's claim")
            elif i is not None:
                text += (f". In distribution KV shift − vanilla {i['mean']:+.3f} ± {i['se']:.3f} "
                         f"({len(i['seeds'])} seed(s)): within two SE, no clear difference in learning speed")
        elif d is None or len(d["seeds"]) < MIN_SEEDS:
            text += f" — inconclusive here: both arms learned, but fewer than {MIN_SEEDS} seeds ran both arms"
        else:
            decided[key] = d["mean"] > 2 * d["se"] and d["kvshift_mean"] > 2 / igsm.MOD
        parts.append(text)
    text = "; ".join(parts) + "."
    if not decided:
        return "inconclusive", text
    paper = any(k in PAPER_SETTINGS for k in decided)
    if all(decided.values()) and paper:
        return "reproduced", text
    note = "" if paper else f" Decided by {', '.join(decided)} only, a smaller split than the paper's."
    if any(decided.values()):
        return "partly reproduced", text + f" KV shift ahead in {', '.join(k for k, w in decided.items() if w)}.{note}"
    return "not reproduced", text + note


def plot_igsm(out: str, summ: dict) -> None:
    """Train loss and teacher-forced test token accuracy vs step (seed 0 of each setting and arm), and the
    seed-mean greedy answer accuracies (test and in-distribution) per setting."""
    plt = pyplot()
    recs = read_jsonl(Path(out) / "metrics.jsonl")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    keys = list(summ["results"])
    for i, att in enumerate(ARMS):
        for j, key in enumerate(keys):
            seed = min((r["seed"] for r in recs if r["setting"] == key), default=0)
            rs = [r for r in recs if r["arm"] == att and r["setting"] == key and r["seed"] == seed]
            tl = [r for r in rs if "loss" in r]
            ev = [r for r in rs if "solution_token_accuracy" in r]
            ls = ("-", "--", ":")[j % 3]
            axes[0].plot([r["step"] for r in tl], [r["loss"] for r in tl], ls, color=f"C{i}", label=f"{att} {key}")
            axes[1].plot([r["step"] for r in ev], [r["solution_token_accuracy"] for r in ev], "o" + ls, color=f"C{i}",
                         label=f"{att} {key} (seed {seed})")
    axes[0].set(xlabel="step", ylabel="train loss on solution tokens (nats)", yscale="log")
    axes[1].set(xlabel="step", ylabel="test solution-token accuracy (teacher forced)")
    x = range(len(keys))
    for i, att in enumerate(ARMS):
        for j, (metric, hatch) in enumerate((("test_answer_accuracy", ""), ("in_distribution_answer_accuracy", "//"))):
            arms = [summ["results"][k]["arms"].get(att) for k in keys]
            axes[2].bar([v + (2 * i + j - 1.5) * 0.18 for v in x], [a[metric] if a else 0 for a in arms], 0.18,
                        color=f"C{i}", hatch=hatch, alpha=0.9 if j == 0 else 0.5,
                        label=f"{att} {'test' if j == 0 else 'in-dist'}")
    axes[2].axhline(summ["chance_answer_accuracy"], color="0.5", ls=":", label="chance (1/23)")
    axes[2].axhline(0.8, color="0.3", ls="--", lw=0.8, label="in-dist. bar (0.8)")
    axes[2].set_xticks(list(x), keys)
    axes[2].set(ylabel="final-answer accuracy (greedy, seed mean)", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"iGSM ({summ['scale']} scale)")
    save_figure(fig, f"{out}/plot.png", dpi=100)


def write_igsm_readme(out: str, s: dict) -> None:
    m = s["runs"][0]["model"]
    t = s["runs"][0]["train"]
    def per(d: dict) -> str:
        return ", ".join(f"{v:.3f}" for v in d.values())

    rows = [("| setting | budget | arm | test answer acc. (per seed) | test fully correct | test token acc. | "
             "in-dist answer acc. (per seed) | in-dist fully correct |"), "|---|---|---|---|---|---|---|---|"]
    for key, r in s["results"].items():
        for att, a in r["arms"].items():
            rows.append(f"| {key} | {r['steps']} × {r['batch_size']}, rows ≤ {r['seq_len']} | {att} | "
                        f"{a['test_answer_accuracy']:.3f} ({per(a['test_answer_accuracy_per_seed'])}) | "
                        f"{a['test_solution_correct']:.3f} | {a['test_solution_token_accuracy']:.3f} | "
                        f"{a['in_distribution_answer_accuracy']:.3f} ({per(a['in_distribution_answer_accuracy_per_seed'])})"
                        f" | {a['in_distribution_solution_correct']:.3f} |")
    times = "; ".join(f"{r['arm']} s{r['seed']}: {r['train_seconds']:.0f} s train + {r['generation_seconds']:.0f} s "
                      f"generation + {r['data_generation_seconds']:.0f} s data" for r in s["runs"])
    ex = s["runs"][-1]["test"]["examples"][:1]
    example = (f"\nExample ({s['runs'][-1]['arm']} s{s['runs'][-1]['seed']}, first test problem):\n\n"
               f"    reference: {ex[0]['reference']}\n    generated: {ex[0]['generated']}\n") if ex else ""
    text = f"""# iGSM (paper App. I)

Commands: `{s['command']}` (summarised by `{s['summarized_by']}`)
Commit: `{s['git_commit']}` · device: {s['device']} · torch {s['torch']} · wall {s['wall_seconds']:.0f} s (all runs)

**Paper:** {s['paper']}

**Task:** kvshift.tasks.igsm (a simplified re-implementation of Ye et al.'s iGSM: mod-23 sum/product/difference
over a 4-layer entity hierarchy, with distractors). Training rows are `<bos> question <sep> solution <eos>` with
n_operations uniform in 1..N (TrN), right-padded to the setting's row length (longer problems redrawn); the loss is
next-token cross-entropy on the solution tokens and `<eos>` only. Test: fixed held-out problems with exactly M
operations (TeM); in-distribution: held-out problems drawn like the training data. Scoring: greedy decoding
(temperature 0, KV cache, left-padded prompts) from `<bos> question <sep>` to `<eos>`; *answer acc.* =
`parse_answer(generated) == answer`; *fully correct* = the whole generated solution passes `igsm.check_solution`;
*token acc.* = teacher-forced next-token accuracy on the reference solution. Chance for the answer is 1/23 =
{s['chance_answer_accuracy']:.3f}. Tr6-Te8 is a smaller split than the paper's (Tr12-Te15, Tr21-Te24).

**Setting:** model {m['n_layers']} layers × {m['dim']} wide, {m['n_heads']} heads, ffn {m['ffn_dim']}, vocab
{m['vocab_size']}; AdamW β=(0.9, 0.95), wd 0.1, lr {t['lr']} with {t['warmup']} warm-up steps then constant, clip 1;
both arms of a seed see the same data stream and start from the same shared weights; steps and batch per setting
in the table. Runs are published in `runs/` per (arm, setting, seed); seeds: {s['seeds']}. Time: {times}.

{chr(10).join(rows)}

**Verdict:** **{s['verdict']}** — {s['verdict_text']}
{example}
![plot](plot.png)
"""
    (Path(out) / "README.md").write_text(text)
