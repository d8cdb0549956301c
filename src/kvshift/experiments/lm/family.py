"""lm-family (beyond the paper): KV shifting beside its family of short causal mixers on real text.

Arms (spec.FAMILY_ARMS): vanilla, kvshift, and vanilla attention with one mixer each (dconv, canon, keyoffset,
smear; `ModelConfig.mixer`), plus KV shift with Canon layers (kvshift_canon), at the lm presets ~10M (1200 steps,
seeds 0-2: lm-seeds' settings, so its vanilla/KV-shift runs are copied where lm-seeds published them on the same
data build) and ~50M (1400 steps, seeds 0-1). Runs train through the lm spec machinery
(`kvshift.experiments.lm.runs`), keyed by config hash and resumable.

Per arm and size: final validation loss Δ vs vanilla of the same seed (mean, min-max, std), the tokens at which
the arm's evaluation curve first reaches vanilla's final loss as a share of vanilla's tokens, non-embedding
parameters and training FLOPs added (the trainer's 6·N + head + attention count per token: 6 FLOPs per mixer
weight and token is exactly the mixers' conv work; keyoffset's copy and smear's gate are not counted), and the
tokens/s and peak-memory ratios vs vanilla from the runs' own summaries (peak memory: CUDA runs only).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from kvshift.experiments.base import write_summary
from kvshift.experiments.lm.report import _readme_tables
from kvshift.experiments.lm.spec import FAMILY_ARMS, parts
from kvshift.experiments.lm.stats import fmt, part_stats, published_runs, si, summary_provenance
from kvshift.train.plot import curves
from kvshift.utils.plot import pyplot, save_figure

NAME = "lm-family"
RIVALS = ("dconv", "canon", "keyoffset", "smear")  # the single family members KV shift is compared with
PAPER = ("Beyond the paper: the paper compares KV shifting with vanilla attention only. Its family (Primer's "
         "depthwise q/k/v convolutions, Canon layers, key offset, smear) adds the same kind of short causal "
         "mixing; the question is whether KV shifting is at least as good as the others at an equal budget.")
CLAIM = ("KV shifting is at least as good as the other members of its family (dconv, Canon layers, key offset, "
         "smear) at an equal training budget.")
RULE = ("per size, every arm's final validation loss minus vanilla's (same seed), over ≥ 2 seeds per arm; KV shift "
        "is beaten at a size when a member (dconv, canon, keyoffset, smear; kvshift_canon is reported, not a "
        "rival) has a lower mean Δ by more than the seed spread (the larger min–max range of the two arms' Δ). "
        "Reproduced: not beaten at every size (10m and 50m); partly: not beaten at one size; not reproduced: "
        "beaten at every size; inconclusive: no size with ≥ 2 seeds of vanilla, KV shift and every member, or "
        "beaten where decided with a size still undecided.")


# ---- pure functions of the runs' numbers ------------------------------------------------------------
def tokens_to_reach_ratio(curve: list[tuple[float, float]], target: float | None, total: float | None) -> float | None:
    """The first evaluated token count at which the (tokens, loss) curve is at or below `target`, divided by
    `total` (vanilla's training tokens); None when it never gets there (or there is no target)."""
    if target is None or not total:
        return None
    for t, loss in curve:
        if loss <= target:
            return t / total
    return None


def spread(xs: list[float]) -> float:
    """max − min (0 for one value)."""
    return max(xs) - min(xs) if xs else 0.0


def _agg(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "min": None, "max": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs),
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def peak_memory(summary: dict) -> int | None:
    """A run's own peak CUDA memory: None on CPU, and for summaries written before the trainer reset the peak at
    the start of each launch (no peak_memory_scope): those can hold the peak of an earlier, larger run of the
    same process (the first lm-family runs did: key offset and smear in every seed, and vanilla's and KV
    shift's seed-2 runs, recorded Canon's peak)."""
    return summary.get("peak_memory_bytes") if summary.get("peak_memory_scope") == "launch" else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def arm_table(runs: dict[str, dict[int, Path]]) -> dict:
    """arm -> Δ, tokens ratio, params/FLOPs added, tokens/s and peak memory ratios vs vanilla (see module doc)."""
    summ = {arm: {seed: json.loads((d / "summary.json").read_text()) for seed, d in by.items()}
            for arm, by in runs.items()}
    base = summ.get("vanilla", {})
    mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
    bq = {"tokens_per_s": mean([s["tokens_per_s"] for s in base.values() if s.get("tokens_per_s")]),
          "peak_memory_bytes": mean([m for s in base.values() if (m := peak_memory(s))])}
    b0 = next(iter(base.values()), None)
    # throughput and memory compare only runs of one kind of device (a run adopted from another experiment's
    # results may come from another GPU)
    same_device = len({s.get("device_name") for by in summ.values() for s in by.values()}) <= 1
    out = {}
    for arm, by in summ.items():
        deltas, ratios = {}, {}
        for seed, s in by.items():
            b = base.get(seed)
            ok = b is not None and not b["diverged"] and b["final_val_loss"] is not None
            if ok and not s["diverged"] and s["final_val_loss"] is not None:
                deltas[str(seed)] = s["final_val_loss"] - b["final_val_loss"]
            if ok:
                ratios[str(seed)] = tokens_to_reach_ratio(curves(runs[arm][seed])["val"], b["final_val_loss"],
                                                          b["tokens"])
        s0 = next(iter(by.values()))
        reached = [r for r in ratios.values() if r is not None]
        out[arm] = {
            "seeds": sorted(by), "delta": _agg(list(deltas.values())), "delta_per_seed": deltas,
            "final_val_loss": _agg([s["final_val_loss"] for s in by.values()]),
            "tokens_ratio_per_seed": ratios, "tokens_ratio_mean": mean(reached),
            "tokens_ratio_reached": f"{len(reached)}/{len(ratios)}",
            "non_embedding_params": s0["non_embedding_params"],
            "params_added": s0["non_embedding_params"] - b0["non_embedding_params"] if b0 else None,
            "flops_per_token": s0.get("flops_per_token"),
            "flops_added": (s0["flops_per_token"] / b0["flops_per_token"] - 1) if b0 and s0.get("flops_per_token")
            and b0.get("flops_per_token") else None,
            "tokens_per_s_ratio": _ratio(mean([s["tokens_per_s"] for s in by.values() if s.get("tokens_per_s")]),
                                         bq["tokens_per_s"]) if same_device else None,
            "peak_memory_ratio": _ratio(mean([m for s in by.values() if (m := peak_memory(s))]),
                                        bq["peak_memory_bytes"]) if same_device else None,
            "diverged": sum(bool(s["diverged"]) for s in by.values())}
    return out


def size_decision(table: dict, min_seeds: int = 2) -> dict | None:
    """KV shift against each rival at one size: None when vanilla, KV shift or a rival has < min_seeds Δs (the
    size cannot decide). Else the ranking by mean Δ, the rivals beating KV shift by more than the spread, and
    the winner."""
    need = ("vanilla", "kvshift", *RIVALS)
    if any(a not in table or table[a]["delta"]["n"] < min_seeds for a in need):
        return None
    kv = table["kvshift"]
    kv_d = list(kv["delta_per_seed"].values())
    beaten_by, margins = [], {}
    for r in RIVALS:
        rd = list(table[r]["delta_per_seed"].values())
        margin = max(spread(kv_d), spread(rd))
        margins[r] = margin
        # a divergence is a loss: KV shift diverging in a seed the rival did not is beaten there; a rival that
        # diverged anywhere does not beat it on its surviving seeds
        if not table[r]["diverged"] and (kv["diverged"] or table[r]["delta"]["mean"] < kv["delta"]["mean"] - margin):
            beaten_by.append(r)
    ranking = sorted((a for a in table if table[a]["delta"]["n"]), key=lambda a: table[a]["delta"]["mean"])
    best_single = min(("kvshift", *RIVALS), key=lambda a: table[a]["delta"]["mean"])
    closest = min(RIVALS, key=lambda a: table[a]["delta"]["mean"])
    return {"holds": not beaten_by, "beaten_by": beaten_by, "spread": margins, "ranking": ranking,
            "best_member": best_single, "closest": closest,
            "closest_ahead": kv["delta"]["mean"] - table[closest]["delta"]["mean"]}


def _power(v: dict) -> str:
    """How far the closest member is from beating KV shift: what the seeds could have shown."""
    r = v.get("closest")
    if r is None:
        return ""
    ahead, margin = v["closest_ahead"], v["spread"][r]
    where = f"{ahead:.4f} ahead of" if ahead > 0 else f"{-ahead:.4f} behind"
    return f" (closest member {r}, {where} KV shift; it needed more than {margin:.4f}, the seed spread, ahead)"


def family_verdict(decisions: dict[str, dict | None], sizes: list[str]) -> tuple[str, str]:
    """decisions: size -> size_decision (None or absent: too few seeds / not run); sizes: every size of the
    experiment. Returns (verdict, the reason in words)."""
    dec = {k: v for k, v in decisions.items() if v is not None}
    if not dec:
        return "inconclusive", "no size has ≥ 2 seeds of vanilla, KV shift and every family member yet"
    holds = [k for k, v in dec.items() if v["holds"]]
    missing = [k for k in sizes if k not in dec]
    why = "; ".join(f"{k}: best single member {v['best_member']}, KV shift "
                    + ("not beaten beyond the seed spread" + _power(v) if v["holds"]
                       else "beaten by " + ", ".join(v["beaten_by"]))
                    for k, v in dec.items())
    if missing:
        why += f"; not decided at {', '.join(missing)} (not run, or fewer than 2 seeds of some arm)"
    if holds:
        return ("reproduced" if not missing and len(holds) == len(dec) else "partly reproduced"), why
    return ("not reproduced" if not missing else "inconclusive"), why


# ---- summary, plot, README ------------------------------------------------------------------------
def summarize(opts, out: Path) -> dict:
    stats, tables, decisions, dirs = {}, {}, {}, []
    all_parts = parts(NAME, opts.scale)
    for p in all_parts:
        runs = published_runs(out, p)
        if not runs:
            continue
        stats[p.name] = part_stats(runs)
        tables[p.name] = arm_table(runs)
        decisions[p.name] = size_decision(tables[p.name])
        dirs += [d for by in runs.values() for d in by.values()]
    if not stats:
        raise ValueError(f"{out}: no finished runs of {NAME} yet (run `kvshift experiment {NAME} --scale "
                         f"{opts.scale}` first)")
    verdict, why = family_verdict(decisions, [p.name for p in all_parts])
    text = "; ".join(_size_text(n, stats[n], tables[n]) for n in tables) + ". " + why + "."
    s = {"experiment": NAME, "scale": opts.scale, "paper": PAPER, "verdict": verdict, "verdict_text": text,
         **summary_provenance(dirs), "arms": tables, "decisions": decisions, "parts": stats}
    write_summary(out, s)
    plot_family(out, stats)
    write_readme(out, s)
    return s


def _size_text(name: str, st: dict, table: dict) -> str:
    v = next(iter(st["runs"]["vanilla"].values()), None) if "vanilla" in st["runs"] else None
    head = f"{name}" + (f" ({si(v['non_embedding_params'])} params, {si(v['tokens'])} tokens)" if v else "")
    cells = []
    for a in FAMILY_ARMS:
        if a == "vanilla" or a not in table or not table[a]["delta"]["n"]:
            continue
        d = table[a]["delta"]
        cells.append(f"{a} {d['mean']:+.4f}" + (f" [{d['min']:+.3f}, {d['max']:+.3f}]" if d["n"] > 1 else "")
                     + f" n={d['n']}")
    return head + ": Δ vs vanilla " + (", ".join(cells) or "none yet")


def plot_family(out: Path, stats: dict) -> None:
    """Per size: validation loss per arm (seed mean, min–max band), and each arm's loss − vanilla's of the same
    seed (mean over seeds, min–max band)."""
    plt = pyplot()
    n = len(stats)
    fig, axes = plt.subplots(2, n, figsize=(5.2 * n + 1, 8), squeeze=False)
    for j, (pname, st) in enumerate(stats.items()):
        ax, ax2 = axes[0][j], axes[1][j]
        bands, seed_curves = {}, {}
        for i, arm in enumerate(st["arms"]):
            seed_curves[arm] = {sd: dict(curves(out / r["run_dir"])["val"]) for sd, r in st["runs"][arm].items()}
            cs = list(seed_curves[arm].values())
            xs = sorted(set.intersection(*(set(c) for c in cs))) if cs else []
            if not xs:
                continue
            ys = [[c[x] for c in cs] for x in xs]
            bands[arm] = (xs, [statistics.fmean(y) for y in ys])
            ax.plot(xs, bands[arm][1], "-", lw=1.3, color=f"C{i}", label=f"{arm} ({len(cs)} seeds)")
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=f"C{i}", alpha=0.2)
        base = seed_curves.get("vanilla", {})
        for i, arm in enumerate(st["arms"]):
            # per seed: the arm's val loss − vanilla's of the same seed; mean line, min–max band
            pairs = [(c, base[sd]) for sd, c in seed_curves.get(arm, {}).items() if sd in base]
            if arm == "vanilla" or not pairs:
                continue
            xs = sorted(set.intersection(*(set(c) & set(b) for c, b in pairs)))
            if not xs:
                continue
            ds = [[c[x] - b[x] for c, b in pairs] for x in xs]
            ax2.plot(xs, [statistics.fmean(d) for d in ds], "-", color=f"C{i}", label=f"{arm} − vanilla")
            ax2.fill_between(xs, [min(d) for d in ds], [max(d) for d in ds], color=f"C{i}", alpha=0.15)
        ys = [y for _, m in bands.values() for y in m]
        if ys:
            ax.set_ylim(min(ys) - 0.05, min(max(ys), min(ys) + 2.0))
        ax.set(title=f"{NAME} {pname}", xlabel="tokens", ylabel="validation loss (seed mean, min–max band)")
        ax2.axhline(0, color="k", lw=0.8)
        ax2.set(xlabel="tokens", ylabel="val loss − vanilla (same seed; mean, min–max)")
        for a in (ax, ax2):
            a.grid(alpha=0.3)
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=7)
    save_figure(fig, out / "plot.png", dpi=110)


def _arm_rows(table: dict) -> list[str]:
    rows = ["| arm | seeds | final val loss (mean) | Δ vs vanilla mean | Δ min – max | Δ std | tokens to vanilla's "
            "final ÷ vanilla's tokens (reached) | non-emb. params added | training FLOPs added | tokens/s ÷ "
            "vanilla | peak memory ÷ vanilla |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in FAMILY_ARMS:
        if a not in table:
            continue
        r, d = table[a], table[a]["delta"]
        pa = "—" if r["params_added"] is None else f"{r['params_added']:+,}"
        rows.append(f"| {a} | {len(r['seeds'])} | {fmt(r['final_val_loss']['mean'])} | {fmt(d['mean'], '+.4f')} | "
                    f"{fmt(d['min'], '+.4f')} – {fmt(d['max'], '+.4f')} | {fmt(d['std'], '.4f')} | "
                    f"{fmt(r['tokens_ratio_mean'], '.2f')} ({r['tokens_ratio_reached']}) | "
                    f"{pa} | "
                    f"{fmt(r['flops_added'], '+.2%')} | {fmt(r['tokens_per_s_ratio'], '.3f')} | "
                    f"{fmt(r['peak_memory_ratio'], '.3f')} |")
    return rows


NOTE = """Every arm of a size shares the initial weights (train.seed) and the batches (data.seed) of its seed; only
the arm's attention kind and mixer differ. Δ = final validation loss − vanilla's of the same seed. Tokens ratio:
the first evaluation at which the arm's validation loss is ≤ vanilla's final loss, in tokens, ÷ vanilla's
training tokens (< 1: the arm gets there sooner; — when no seed reached it). FLOPs added: the trainer's training
FLOPs per token (6·non-embedding params + head + attention) vs vanilla's; each mixer weight is used once per
token, so 6 FLOPs per weight and token is the mixers' own conv work (keyoffset's copy and smear's gate are not
counted: ≈ 0). Tokens/s: the trainer's steady-state throughput; peak memory: `torch.cuda.max_memory_allocated`
since the run's launch (CUDA runs; — on CPU, and for runs trained before the trainer reset the peak at each
launch: several runs share a process, so such a record can be an earlier run's peak); both ratios are left
out (—) when a size's runs come from different kinds of GPU. The members' cost measured in one process,
vanilla beside each, is the bench's family-cost row.
"""


def write_readme(out: Path, s: dict) -> None:
    body = []
    for pname, table in s["arms"].items():
        d = s["decisions"].get(pname)
        body += [f"### {pname}: per arm", "", *_arm_rows(table), "",
                 ("Too few seeds to decide at this size." if d is None else
                  f"Ranking by mean Δ: {', '.join(d['ranking'])}. Best single member: {d['best_member']}; KV shift "
                  + ("not beaten beyond the seed spread" + _power(d) + "." if d["holds"]
                     else f"beaten by {', '.join(d['beaten_by'])}.")),
                 ""]
    text = f"""# {s['experiment']} ({s['scale']} scale)

Commands: `{s['command']}`
Commit: `{s['git_commit']}` · device: {s['device']} · torch {s['torch']} · summarised by `{s['summarized_by']}`

**Question:** {s['paper']}

**Ours:** **{s['verdict']}** — {s['verdict_text']}

**Rule:** {RULE}

{NOTE}
{chr(10).join(body)}
## Every run

{_readme_tables(s, out)}
![plot](plot.png)
"""
    (out / "README.md").write_text(text)
