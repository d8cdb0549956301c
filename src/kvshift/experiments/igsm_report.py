"""Plot and README of the iGSM results directory (kvshift.experiments.igsm)."""

from __future__ import annotations

from pathlib import Path

from kvshift.utils.io import read_jsonl
from kvshift.utils.plot import pyplot, save_figure

ARMS = ("vanilla", "kvshift")


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
