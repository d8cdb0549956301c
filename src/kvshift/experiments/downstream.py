"""lm-downstream: zero-shot benchmarks and induction-head analysis of lm-main's vanilla / KV-shift pair.

    kvshift experiment lm-downstream --scale gpu --input vanilla=DIR --input kvshift=DIR [--tag 10m] [--out DIR]

DIR is an exported model (`kvshift export RUN DIR`, or scripts/device/export.sh on the device) or the
evaluation JSON of a model scored elsewhere (`kvshift eval --scores`). Each arm is evaluated with
`kvshift.eval.run_eval` (lm-evaluation-harness, offline tasks), unless <runs>/eval/<DIR name>-<hash of its weights>.json already
holds a finished evaluation of the same tasks and limit, and analysed with `kvshift.eval.analyze` unless
<out>/analysis/<tag>-<arm>/analysis.json exists. The summary compares the arms task by task (accuracy
± binomial standard error; a difference counts when it exceeds twice the standard error of the difference)
and head by head: induction heads (prefix-matching score > 0.5) and previous-token heads (> 0.5) with their
layers. The paper (Tables 2-3) reports benchmark gains at 1.5B-19B parameters; at ~10M parameters most tasks
sit at chance, which the summary says where it happens.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from kvshift.eval.analysis import analyze
from kvshift.eval.harness import load_model, run_eval
from kvshift.experiments.base import Experiment, RunOptions, write_summary
from kvshift.utils.io import file_sha256
from kvshift.utils.plot import pyplot, save_figure
from kvshift.utils.provenance import provenance

TASKS = ("lambada", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge")
CHANCE = {"lambada": 0.0, "hellaswag": 0.25, "piqa": 0.5, "winogrande": 0.5, "arc_easy": 0.25,
          "arc_challenge": 0.25, "mmlu": 0.25}
HEAD_THRESHOLD = 0.5
PAPER = ("Tables 2-3: KV shifting improves zero/few-shot benchmark averages at 1.5B, 2.9B and 19B parameters; "
         "the paper's analysis: KV shifting forms induction heads without a separate previous-token head.")


def _arms(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in [s for it in items for s in it.split(",") if s.strip()]:
        if "=" not in item:
            raise ValueError(f"--input: expected ARM=DIR, got {item!r}")
        arm, d = item.split("=", 1)
        if d.endswith(".json"):
            if not Path(d).is_file():
                raise FileNotFoundError(f"--input {arm}: no evaluation file {d}")
        elif not (Path(d) / "config.json").is_file():
            raise FileNotFoundError(f"--input {arm}: {d} is not an exported model directory (no config.json) "
                                    "nor an evaluation .json")
        out[arm.strip()] = Path(d)
    if "vanilla" not in out or len(out) < 2:
        raise ValueError("--input: needs vanilla=DIR and at least one other arm")
    return out


def _export_info(model_dir: Path) -> dict:
    """Where an exported model came from (kvshift_export.json: run, step, config) and its weights' sha256."""
    info = {}
    if model_dir.suffix == ".json":  # scored elsewhere: what kvshift eval-score recorded about the model
        return dict(json.loads(model_dir.read_text()).get("scored") or {})
    if (model_dir / "kvshift_export.json").is_file():
        info = json.loads((model_dir / "kvshift_export.json").read_text())
    if (model_dir / "model.safetensors").is_file():
        info["weights_sha256"] = file_sha256(model_dir / "model.safetensors")
    return info


def evaluation(model_dir: Path, tasks, limit, eval_dir: Path, **kw) -> dict:
    """A finished evaluation of `tasks` at `limit` from eval_dir/<model>.json, else a new one written there.
    model_dir may also be such a JSON itself (e.g. `kvshift eval --scores` of a model scored elsewhere)."""
    if model_dir.suffix == ".json":
        r = json.loads(model_dir.read_text())
        if not set(tasks) <= set(r.get("results", {})) or r.get("setup", {}).get("limit") != limit:
            raise ValueError(f"{model_dir}: does not hold tasks {list(tasks)} at limit {limit}")
        return r
    # keyed by the weights' content (sha256 of model.safetensors; the resolved path where there is none): two
    # models in directories of the same name, or a model re-exported into the same directory, never share one
    weights = model_dir / "model.safetensors"
    key = file_sha256(weights)[:16] if weights.is_file() else hashlib.sha1(str(model_dir.resolve()).encode()).hexdigest()[:16]
    path = eval_dir / f"{model_dir.name}-{key}.json"
    if path.is_file():
        r = json.loads(path.read_text())
        if set(tasks) <= set(r.get("results", {})) and r.get("setup", {}).get("limit") == limit:
            return r
    eval_dir.mkdir(parents=True, exist_ok=True)
    return run_eval(str(model_dir), list(tasks), limit=limit, out=path, **kw)


def analysis(model_dir: Path, path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    if model_dir.suffix == ".json":
        raise FileNotFoundError(f"{path}: no head analysis of the model behind {model_dir} (run `kvshift analyze` "
                                "where the model is, e.g. scripts/device/downstream.sh)")
    model, _ = load_model(str(model_dir))
    return analyze(model, out=path.parent, title=path.parent.name)


def heads(report: dict, kind: str, threshold: float = HEAD_THRESHOLD) -> list[list[int]]:
    """[layer, head] of every head whose `kind` score exceeds threshold."""
    return [[i, j] for i, row in enumerate(report["scores"][kind]) for j, v in enumerate(row) if v > threshold]


def paired_se(a: dict, b: dict, task: str, metric: str) -> float | None:
    """Standard error of a's accuracy minus b's on the same documents, from their per-document results (the
    SE of the mean of the per-document differences); None unless both evaluations keep them for the same
    documents."""
    x = (a.get("per_doc") or {}).get(task, {}).get(metric)
    y = (b.get("per_doc") or {}).get(task, {}).get(metric)
    if not x or not y or len(x) != len(y) or len(x) < 2:
        return None
    d = [int(u) - int(v) for u, v in zip(x, y)]
    n = len(d)
    mean = sum(d) / n
    return math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1) / n)


def task_rows(evals: dict[str, dict], tasks, base_arm: str = "vanilla") -> dict:
    """Per task: each model's accuracy ± binomial SE, and each other model's difference from `base_arm`
    (where that model was evaluated) with its SE (paired over documents where both evaluations keep
    per-document results, else of two independent samples) and whether it exceeds twice that."""
    rows = {}
    for t in tasks:
        row = {"chance": CHANCE.get(t)}
        for arm, r in evals.items():
            res, n = r["results"][t], r["n_samples"][t]["effective"]
            acc = res.get("acc_norm", res["acc"]) if t in ("hellaswag", "arc_easy", "arc_challenge") else res["acc"]
            row[arm] = {"acc": acc, "se": math.sqrt(max(acc * (1 - acc), 1e-12) / n), "n": n,
                        **({"perplexity": res["perplexity"]} if "perplexity" in res else {})}
        base = row.get(base_arm)
        metric = "acc_norm" if t in ("hellaswag", "arc_easy", "arc_challenge") else "acc"
        for arm in evals if base is not None else ():
            if arm != base_arm:
                d = row[arm]["acc"] - base["acc"]
                se, paired = paired_se(evals[arm], evals[base_arm], t, metric), True
                if se is None:  # no per-document results on both sides: two independent samples
                    se, paired = math.hypot(row[arm]["se"], base["se"]), False
                row[arm] |= {"diff": d, "diff_se": se, "paired": paired, "significant": abs(d) > 2 * se}
        row["metric"] = metric
        rows[t] = row
    return rows


def verdict(rows: dict, arm: str) -> tuple[str, str]:
    better = [t for t, r in rows.items() if r[arm]["significant"] and r[arm]["diff"] > 0]
    worse = [t for t, r in rows.items() if r[arm]["significant"] and r[arm]["diff"] < 0]
    near = [t for t, r in rows.items() if r["chance"] and max(r[a]["acc"] for a in ("vanilla", arm)) < r["chance"] + 0.05]
    testable = [t for t in rows if t not in near]
    mean = sum(r[arm]["diff"] for r in rows.values()) / len(rows)
    text = (f"{arm} − vanilla accuracy: mean {mean:+.4f} over {len(rows)} tasks; beyond 2 standard errors: better on "
            f"{', '.join(better) or 'none'}, worse on {', '.join(worse) or 'none'}; within 5 points of chance for both "
            f"arms: {', '.join(near) or 'none'}.")
    if worse:
        return "not reproduced", text
    if better:
        # one task above chance is too narrow a base for "reproduced" on a claim about benchmark averages
        return ("reproduced" if len(testable) >= 2 and len(better) * 2 >= len(testable) else "partly reproduced"), text
    # no difference beyond 2 SE: the run could not separate the arms, which says nothing against a gain smaller
    # than twice the standard error of the difference on each task
    margin = {t: 2 * r[arm]["diff_se"] for t, r in rows.items() if t in testable and r[arm].get("diff_se") is not None}
    return "inconclusive", text + (
        " No task differs beyond 2 standard errors" + (" and every task is near chance" if not testable else "")
        + (f" (smallest detectable difference: {', '.join(f'{t} {m:.3f}' for t, m in margin.items())})"
           if margin else "") + ": the run cannot separate the arms.")


def run(models: dict[str, Path], *, tasks=TASKS, limit=None, name="10m", eval_dir=Path("runs/eval"),
        out=Path("results/lm-downstream-gpu"), scale: str = "gpu", note: str | None = None, **eval_kw) -> dict:
    evals = {arm: evaluation(d, tasks, limit, Path(eval_dir), **eval_kw) for arm, d in models.items()}
    rows = task_rows(evals, tasks)
    an = {arm: analysis(d, Path(out) / "analysis" / f"{name}-{arm}" / "analysis.json") for arm, d in models.items()}
    head_rows = {arm: {"induction_heads": heads(a, "prefix_matching"), "previous_token_heads": heads(a, "previous_token"),
                       "max": a["max"], "argmax": a["argmax"], "n_layers": len(a["scores"]["prefix_matching"])}
                 for arm, a in an.items()}
    arm = next(a for a in models if a != "vanilla")
    v, text = verdict(rows, arm)
    text = f"{name} pair: {text}"
    hv, hk = head_rows["vanilla"], head_rows[arm]
    first = lambda hs: min((h[0] for h in hs), default=None)  # noqa: E731
    text += (f" Induction heads (prefix matching > {HEAD_THRESHOLD}): vanilla {len(hv['induction_heads'])} (first at layer "
             f"{first(hv['induction_heads'])}), {arm} {len(hk['induction_heads'])} (first at layer "
             f"{first(hk['induction_heads'])}); previous-token heads: vanilla {len(hv['previous_token_heads'])}, "
             f"{arm} {len(hk['previous_token_heads'])}.")
    training = {}  # runs trained again to be scored (scripts/device/downstream.sh): their summaries, if copied
    for a in models:
        f = Path(out) / "runs" / f"{a}-s0" / "summary.json"
        if f.is_file():
            t = json.loads(f.read_text())
            training[a] = {k: t.get(k) for k in ("final_val_loss", "tokens", "steps", "tokens_per_s", "status")}
    summ = {"experiment": "lm-downstream", "scale": scale, "paper": PAPER, **provenance(),
            "name": name, "training": training, **({"note": note} if note else {}), "limit": limit,
            "models": {a: str(d) for a, d in models.items()},
            "exports": {a: _export_info(d) for a, d in models.items()},
            "evaluations": {a: {k: e.get(k) for k in ("model", "setup", "versions", "git_commit", "command", "device_name")}
                            for a, e in evals.items()},
            "tasks": rows, "heads": head_rows, "verdict": v, "verdict_text": text}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_summary(out, summ)
    _plot(rows, head_rows, an, out / "plot.png")
    _readme(summ, out / "README.md")
    return summ


def _plot(rows, head_rows, an, path: Path) -> None:

    plt = pyplot()
    arms = list(head_rows)
    fig, axes = plt.subplots(1, 1 + len(arms), figsize=(5.5 + 3.6 * len(arms), 4), squeeze=False)
    ax = axes[0][0]
    w = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        xs = [k + i * w for k in range(len(rows))]
        ax.bar(xs, [r[arm]["acc"] for r in rows.values()], w, yerr=[r[arm]["se"] for r in rows.values()],
               label=arm, color=f"C{i}")
    for k, r in enumerate(rows.values()):
        if r["chance"]:
            ax.hlines(r["chance"], k - w / 2, k + w * (len(arms) - 0.5), color="k", ls=":", lw=1)
    ax.set_xticks([k + w * (len(arms) - 1) / 2 for k in range(len(rows))], list(rows), rotation=30, ha="right")
    ax.set_ylabel("accuracy (dotted: chance)")
    ax.legend(fontsize=8)
    for ax, arm in zip(axes[0][1:], arms):
        im = ax.imshow(an[arm]["scores"]["prefix_matching"], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{arm}: prefix-matching score")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes[0][-1])
    save_figure(fig, path)


def _readme(s: dict, path: Path) -> None:
    arms = list(s["models"])
    other = [a for a in arms if a != "vanilla"]
    lines = [f"# lm-downstream, {s.get('name', '')} (models trained on the GPU by lm-main, lm-eval run on {s['device']})", "",
             f"Command: `{s['command']}`", f"Commit: `{s['git_commit']}`", "", f"**Paper:** {s['paper']}", "",
             f"**Ours:** **{s['verdict']}** — {s['verdict_text']}", ""]
    if s.get("note"):
        lines += [f"*Note:* {s['note']}", ""]
    scored = {a: e for a, e in s["exports"].items() if e.get("device_name") and e.get("requests_sha256")}
    if scored:
        e = next(iter(scored.values()))
        lines += [f"The log-likelihoods were computed on {e['device_name']} ({e['dtype']}, torch {e['torch']}) by "
                  "`kvshift eval-score` from requests recorded here, then replayed through lm-eval here "
                  "(`kvshift.eval.offload`; where the models came from: the note).", ""]
    if s.get("training"):
        lines += ["The re-run's own validation loss (same training tokens as lm-main; its validation split may be "
                  "a subset, see the note):", "",
                  "| arm | final val loss (re-run) | tokens | status |", "|---|---|---|---|"]
        lines += [f"| {a} | {t['final_val_loss']:.4f} | {t['tokens']:,} | {t['status']} |"
                  for a, t in s["training"].items() if t.get("final_val_loss") is not None]
        lines += [""]
    lines += ["Zero-shot, lm-evaluation-harness with the offline task files of `kvshift eval`; accuracy (acc_norm for "
             "HellaSwag and ARC) ± binomial standard error; Δ counts (*) beyond twice the standard error of the "
             "difference (p: paired over the documents, where both evaluations keep per-document results).", "",
             "| task | n | chance | " + " | ".join(arms) + " | " + " | ".join(f"Δ {a}" for a in other) + " |",
             "|---|---|---|" + "---|" * (len(arms) + len(other))]
    for t, r in s["tasks"].items():
        cells = [f"{r[a]['acc']:.4f} ± {r[a]['se']:.4f}" for a in arms]
        deltas = [f"{r[a]['diff']:+.4f}{' *' if r[a]['significant'] else ''}{' p' if r[a].get('paired') else ''}"
                  for a in other]
        lines.append(f"| {t} ({r['metric']}) | {r['vanilla']['n']} | {r['chance']} | " + " | ".join(cells + deltas) + " |")
    lines += ["", "Heads (layer, head) with a score above 0.5 on repeated random tokens (`kvshift analyze`):", "",
              "| arm | induction heads | previous-token heads | max prefix matching | max previous token |", "|---|---|---|---|---|"]
    for a, h in s["heads"].items():
        lines.append(f"| {a} | {h['induction_heads']} | {h['previous_token_heads']} | {h['max']['prefix_matching']:.3f} | "
                     f"{h['max']['previous_token']:.3f} |")
    lines += ["", "![plot](plot.png)", ""]
    path.write_text("\n".join(lines))


def run_experiment(opts: RunOptions, out: Path) -> dict:
    if not opts.inputs:
        raise ValueError("lm-downstream needs the models: --input vanilla=DIR --input kvshift=DIR")
    return run(_arms(opts.inputs), name=opts.tag or "10m", eval_dir=opts.runs / "eval", out=out, scale=opts.scale,
               note=opts.note, device="cuda" if torch.cuda.is_available() else "cpu", batch_size=32)


EXPERIMENTS = [
    Experiment(
        "lm-downstream", "Tables 2-3",
        "KV shifting improves downstream benchmarks (1.5B-19B); induction heads form without a previous-token head.",
        "per task, a difference counts when it exceeds twice the standard error of the difference; tasks within 5 "
        "points of chance for both arms are named and cannot test the claim. Reproduced: at least 2 other tasks, KV "
        "shift better on at least half of them and worse on none; partly: better on some and worse on none; not reproduced: "
        "worse on a task; inconclusive: no task differs (the run cannot separate the arms).",
        "Tables 2-3: lm-eval benchmarks and head analysis of an exported vanilla / KV-shift pair", run_experiment,
        options=("inputs", "tag", "note", "runs")),
]
