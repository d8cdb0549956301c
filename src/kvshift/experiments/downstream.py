"""lm-downstream: zero-shot benchmarks and induction-head analysis of lm-main's vanilla / KV-shift pair.

    python -m kvshift.experiments.downstream --models vanilla=DIR,kvshift=DIR [--tasks ...] [--limit N]
        [--eval-dir cache/eval] [--analysis-dir results/analyze-lm-gpu] [--name 10m] [--out results/lm-downstream-gpu]

DIR is an exported model (`kvshift export RUN DIR`, or scripts/device/export.sh on the device). Each arm is
evaluated with `kvshift.eval.run_eval` (lm-evaluation-harness, offline tasks), unless <eval-dir>/<DIR name>.json
already holds a finished evaluation of the same tasks and limit, and analysed with `kvshift.eval.analyze`
unless <analysis-dir>/<name>-<arm>/analysis.json exists. The summary compares the arms task by task (accuracy
± binomial standard error; a difference counts when it exceeds twice the standard error of the difference)
and head by head: induction heads (prefix-matching score > 0.5) and previous-token heads (> 0.5) with their
layers. The paper (Tables 2-3) reports benchmark gains at 1.5B-19B parameters; at ~10M parameters most tasks
sit at chance, which the summary says where it happens.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

from kvshift.utils.plot import pyplot, save_figure
from kvshift.experiments.common import provenance, write_summary

TASKS = ("lambada", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge")
CHANCE = {"lambada": 0.0, "hellaswag": 0.25, "piqa": 0.5, "winogrande": 0.5, "arc_easy": 0.25,
          "arc_challenge": 0.25, "mmlu": 0.25}
HEAD_THRESHOLD = 0.5
PAPER = ("Tables 2-3: KV shifting improves zero/few-shot benchmark averages at 1.5B, 2.9B and 19B parameters; "
         "the paper's analysis: KV shifting forms induction heads without a separate previous-token head.")


def _arms(spec: str) -> dict[str, Path]:
    out = {}
    for item in [s for s in spec.split(",") if s.strip()]:
        if "=" not in item:
            raise ValueError(f"--models: expected ARM=DIR, got {item!r}")
        arm, d = item.split("=", 1)
        if d.endswith(".json"):
            if not Path(d).is_file():
                raise FileNotFoundError(f"--models {arm}: no evaluation file {d}")
        elif not (Path(d) / "config.json").is_file():
            raise FileNotFoundError(f"--models {arm}: {d} is not an exported model directory (no config.json) "
                                    "nor an evaluation .json")
        out[arm.strip()] = Path(d)
    if "vanilla" not in out or len(out) < 2:
        raise ValueError("--models: needs vanilla=DIR and at least one other arm")
    return out


def _export_info(model_dir: Path) -> dict:
    """Where an exported model came from (kvshift_export.json: run, step, config) and its weights' sha256."""
    from kvshift.utils.io import file_sha256

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
    path = eval_dir / f"{model_dir.name}.json"
    if path.is_file():
        r = json.loads(path.read_text())
        if set(tasks) <= set(r.get("results", {})) and r.get("setup", {}).get("limit") == limit:
            return r
    from kvshift.eval.harness import run_eval

    eval_dir.mkdir(parents=True, exist_ok=True)
    return run_eval(str(model_dir), list(tasks), limit=limit, out=path, **kw)


def analysis(model_dir: Path, path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    if model_dir.suffix == ".json":
        raise FileNotFoundError(f"{path}: no head analysis of the model behind {model_dir} (run `kvshift analyze` "
                                "where the model is, e.g. scripts/device/downstream.sh)")
    from kvshift.eval.analysis import analyze
    from kvshift.eval.harness import load_model

    model, _ = load_model(str(model_dir))
    return analyze(model, out=path.parent, title=path.parent.name)


def heads(report: dict, kind: str, threshold: float = HEAD_THRESHOLD) -> list[list[int]]:
    """[layer, head] of every head whose `kind` score exceeds threshold."""
    return [[i, j] for i, row in enumerate(report["scores"][kind]) for j, v in enumerate(row) if v > threshold]


def task_rows(evals: dict[str, dict], tasks) -> dict:
    rows = {}
    for t in tasks:
        row = {"chance": CHANCE.get(t)}
        for arm, r in evals.items():
            res, n = r["results"][t], r["n_samples"][t]["effective"]
            acc = res.get("acc_norm", res["acc"]) if t in ("hellaswag", "arc_easy", "arc_challenge") else res["acc"]
            row[arm] = {"acc": acc, "se": math.sqrt(max(acc * (1 - acc), 1e-12) / n), "n": n,
                        **({"perplexity": res["perplexity"]} if "perplexity" in res else {})}
        base = row["vanilla"]
        for arm in evals:
            if arm != "vanilla":
                d = row[arm]["acc"] - base["acc"]
                se = math.hypot(row[arm]["se"], base["se"])
                row[arm] |= {"diff": d, "diff_se": se, "significant": abs(d) > 2 * se}
        row["metric"] = "acc_norm" if t in ("hellaswag", "arc_easy", "arc_challenge") else "acc"
        rows[t] = row
    return rows


def verdict(rows: dict, arm: str) -> tuple[str, str]:
    better = [t for t, r in rows.items() if r[arm]["significant"] and r[arm]["diff"] > 0]
    worse = [t for t, r in rows.items() if r[arm]["significant"] and r[arm]["diff"] < 0]
    near = [t for t, r in rows.items() if r["chance"] and max(r[a]["acc"] for a in ("vanilla", arm)) < r["chance"] + 0.05]
    mean = sum(r[arm]["diff"] for r in rows.values()) / len(rows)
    v = "reproduced" if len(better) * 2 >= len(rows) and not worse else "partly reproduced" if better and not worse \
        else "not reproduced"
    text = (f"{arm} − vanilla accuracy: mean {mean:+.4f} over {len(rows)} tasks; beyond 2 standard errors: better on "
            f"{', '.join(better) or 'none'}, worse on {', '.join(worse) or 'none'}; within 5 points of chance for both "
            f"arms: {', '.join(near) or 'none'}.")
    return v, text


def run(models: dict[str, Path], *, tasks=TASKS, limit=None, name="10m", eval_dir=Path("cache/eval"),
        analysis_dir=Path("results/analyze-lm-gpu"), out=Path("results/lm-downstream-gpu"), command=None,
        note: str | None = None, **eval_kw) -> dict:
    evals = {arm: evaluation(d, tasks, limit, Path(eval_dir), **eval_kw) for arm, d in models.items()}
    rows = task_rows(evals, tasks)
    an = {arm: analysis(d, Path(analysis_dir) / f"{name}-{arm}" / "analysis.json") for arm, d in models.items()}
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
    summ = {"experiment": "lm-downstream", "scale": "gpu", "paper": PAPER, **provenance(),
            "name": name, "training": training, **({"note": note} if note else {}),
            **({"command": command} if command else {}), "limit": limit,
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
             "difference.", "",
             "| task | n | chance | " + " | ".join(arms) + " | " + " | ".join(f"Δ {a}" for a in other) + " |",
             "|---|---|---|" + "---|" * (len(arms) + len(other))]
    for t, r in s["tasks"].items():
        cells = [f"{r[a]['acc']:.4f} ± {r[a]['se']:.4f}" for a in arms]
        deltas = [f"{r[a]['diff']:+.4f}{' *' if r[a]['significant'] else ''}" for a in other]
        lines.append(f"| {t} ({r['metric']}) | {r['vanilla']['n']} | {r['chance']} | " + " | ".join(cells + deltas) + " |")
    lines += ["", "Heads (layer, head) with a score above 0.5 on repeated random tokens (`kvshift analyze`):", "",
              "| arm | induction heads | previous-token heads | max prefix matching | max previous token |", "|---|---|---|---|---|"]
    for a, h in s["heads"].items():
        lines.append(f"| {a} | {h['induction_heads']} | {h['previous_token_heads']} | {h['max']['prefix_matching']:.3f} | "
                     f"{h['max']['previous_token']:.3f} |")
    lines += ["", "![plot](plot.png)", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvshift.experiments.downstream", description=__doc__.split("\n")[0])
    ap.add_argument("--models", required=True, help="ARM=DIR,... (vanilla required)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--name", default="10m", help="model size tag for the analysis directories")
    ap.add_argument("--eval-dir", default="cache/eval")
    ap.add_argument("--analysis-dir", default="results/analyze-lm-gpu")
    ap.add_argument("--out", default="results/lm-downstream-gpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--note", help="a sentence for the summary and README (how the models were obtained, caveats)")
    args = ap.parse_args(argv)
    try:
        s = run(_arms(args.models), tasks=[t for t in args.tasks.split(",") if t], limit=args.limit, name=args.name,
                eval_dir=Path(args.eval_dir), analysis_dir=Path(args.analysis_dir), out=Path(args.out),
                device=args.device, batch_size=args.batch_size, note=args.note,
                command="python -m kvshift.experiments.downstream " + shlex.join(sys.argv[1:] if argv is None else argv))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"lm-downstream: {s['verdict']} — {s['verdict_text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
