"""`kvshift compare CONFIG --arms vanilla,kvshift --seeds 0,1`: the paper's controlled comparison.

For each seed, every arm is trained with the same init seed (train.seed; `LM(config, seed)` makes all
shared weights identical, the shift coefficients come from their own generator) and the same data
order (data.seed = the seed as well, so seeds are independent replicates of both). Arms run one
after the other into `<out>/<arm>-s<seed>/`; a run that already finished is not repeated and an
interrupted one resumes, so a killed comparison can simply be rerun.

compare.json holds, per arm and seed, the final validation loss and the divergence flag; per seed the
difference to the first (baseline) arm and the speed-up: tokens the baseline needs to first reach its
final val loss ÷ tokens the arm needs to reach that same loss, each by linear interpolation of the
validation curve (null when the arm never reaches it); per arm the mean ± std (sample std, n-1) over
the seeds that did not diverge.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from kvshift.layers.attention import ATTENTION_KINDS
from kvshift.train.config import load_config
from kvshift.train.plot import curves
from kvshift.train.trainer import train
from kvshift.utils.plot import pyplot, save_figure

__all__ = ["compare", "tokens_to_reach", "summarize"]


def tokens_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """First token count at which the (tokens, loss) curve reaches `target`, interpolating linearly
    between evaluations; None when it never does."""
    prev = None
    for t, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(t)
            t0, l0 = prev
            return t0 + (l0 - target) / (l0 - loss) * (t - t0)
        prev = (t, loss)
    return None


def _mean_std(xs: list[float]) -> dict:
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def summarize(runs: dict[str, dict[int, Path]]) -> dict:
    """runs: arm -> seed -> run dir (with summary.json and metrics.jsonl). The first arm is the baseline."""
    arms = list(runs)
    base = arms[0]
    out: dict = {"baseline": base, "arms": arms, "runs": {}, "per_seed": {}, "aggregate": {}}
    for arm in arms:
        out["runs"][arm] = {}
        for seed, rd in runs[arm].items():
            s = json.loads((Path(rd) / "summary.json").read_text())
            out["runs"][arm][str(seed)] = {
                "run_dir": str(rd), "final_val_loss": s["final_val_loss"], "best_val_loss": s["best_val_loss"],
                "final_loss": s["final_loss"], "diverged": s["diverged"], "diverged_step": s["diverged_step"],
                "tokens": s["tokens"], "wall_time_s": s["wall_time_s"], "tokens_per_s": s["tokens_per_s"]}
    seeds = sorted({seed for arm in arms for seed in runs[arm]})
    for seed in seeds:
        ps: dict = {}
        b = out["runs"][base].get(str(seed))
        bcurve = curves(runs[base][seed])["val"] if b else []
        target = b["final_val_loss"] if b and not b["diverged"] else None
        t_base = tokens_to_reach(bcurve, target) if target is not None else None
        for arm in arms[1:]:
            r = out["runs"][arm].get(str(seed))
            if r is None:
                continue
            ok = target is not None and not r["diverged"] and r["final_val_loss"] is not None
            t_arm = tokens_to_reach(curves(runs[arm][seed])["val"], target) if ok else None
            ps[arm] = {
                "diff": (r["final_val_loss"] - target) if ok else None,
                "baseline_tokens_to_final": t_base,
                "tokens_to_baseline_final": t_arm,
                "speedup": (t_base / t_arm) if (t_arm and t_base) else None,
            }
        out["per_seed"][str(seed)] = ps
    for arm in arms:
        vals = [r["final_val_loss"] for r in out["runs"][arm].values()
                if not r["diverged"] and r["final_val_loss"] is not None]
        agg = {"final_val_loss": _mean_std(vals),
               "diverged": sum(r["diverged"] for r in out["runs"][arm].values()),
               "seeds": len(out["runs"][arm])}
        if arm != base:
            diffs = [p[arm]["diff"] for p in out["per_seed"].values() if arm in p and p[arm]["diff"] is not None]
            sps = [p[arm]["speedup"] for p in out["per_seed"].values() if arm in p and p[arm]["speedup"] is not None]
            agg["diff"] = _mean_std(diffs)
            agg["speedup"] = _mean_std(sps)
            agg["better_in"] = sum(x < 0 for x in diffs)
        out["aggregate"][arm] = agg
    return out


def plot_compare(runs: dict[str, dict[int, Path]], out_png: Path) -> Path:

    plt = pyplot()
    arms = list(runs)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, arm in enumerate(arms):
        for j, (seed, rd) in enumerate(sorted(runs[arm].items())):
            v = curves(rd)["val"]
            if v:
                x, y = zip(*v)
                ax.plot(x, y, "o-", ms=2.5, color=f"C{i}", alpha=0.9 if j == 0 else 0.6,
                        label=arm if j == 0 else None)
    ax.set_xlabel("tokens"); ax.set_ylabel("validation loss (nats/token)"); ax.grid(alpha=0.3); ax.legend()
    base = arms[0]
    for i, arm in enumerate(arms[1:], start=1):
        for j, (seed, rd) in enumerate(sorted(runs[arm].items())):
            if seed not in runs[base]:
                continue
            b = dict(curves(runs[base][seed])["val"])
            a = dict(curves(rd)["val"])
            xs = sorted(set(a) & set(b))
            if xs:
                ax2.plot(xs, [a[x] - b[x] for x in xs], "o-", ms=2.5, color=f"C{i}",
                         label=f"{arm} − {base}" if j == 0 else None)
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xlabel("tokens"); ax2.set_ylabel("val loss difference"); ax2.grid(alpha=0.3)
    if len(arms) > 1:
        ax2.legend()
    save_figure(fig, out_png, dpi=120)
    return out_png


def compare(config: str, arms: list[str], seeds: list[int], *, overrides: list[str] | None = None,
            out: str | Path, fsdp: bool = False, log=print) -> dict:

    if not arms:
        raise ValueError("arms must name at least one attention kind")
    bad = [a for a in arms if a not in ATTENTION_KINDS]
    if bad:
        raise ValueError(f"unknown arms {bad}; arms are attention kinds: {list(ATTENTION_KINDS)}")
    if len(set(arms)) != len(arms):
        raise ValueError(f"arms must be distinct, got {arms}")
    out = Path(out)
    runs: dict[str, dict[int, Path]] = {a: {} for a in arms}
    for seed in seeds:
        for arm in arms:
            rd = out / f"{arm}-s{seed}"
            runs[arm][seed] = rd
            sp = rd / "summary.json"
            if sp.is_file() and json.loads(sp.read_text()).get("status") in ("finished", "diverged"):
                log(f"[compare] {rd} already done")
                continue
            cfg = load_config(config, [*(overrides or []), f"model.attention={arm}", f"train.seed={seed}",
                                       f"data.seed={seed}"])
            s = train(cfg, rd, resume=True, fsdp=fsdp, command=f"compare {config} arm={arm} seed={seed}")
            if s["status"] == "interrupted":
                log("[compare] interrupted; rerun the same command to continue")
                return {"status": "interrupted"}
    res = {"config": str(config), "overrides": overrides or [], "seeds": seeds, **summarize(runs)}
    if int(os.environ.get("RANK", "0")) == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(res, indent=1) + "\n")
        plot_compare(runs, out / "compare.png")
        for arm, agg in res["aggregate"].items():
            m = agg["final_val_loss"]
            line = f"[compare] {arm}: final val loss {m['mean']} ± {m['std']} (n={m['n']}, diverged {agg['diverged']})"
            if "speedup" in agg:
                line += f", diff {agg['diff']['mean']}, speed-up {agg['speedup']['mean']}"
            log(line)
    return res
