"""upcycle-benchmarks: zero-shot lm-eval scores of the pretrained source model (SmolLM2-135M converted with
the identity shift, `kvshift convert-llama`) and of each `upcycle` arm after continued training.

    kvshift experiment upcycle-benchmarks --scale cpu|gpu --input source=DIR [--input vanilla=DIR
        --input kvshift=DIR --input kshift=DIR]

DIR is a model directory (`kvshift convert-llama`, `kvshift export`) or the evaluation JSON of a model scored
elsewhere (`kvshift eval --scores`). The source model comes first, so a reader sees how far above chance the
benchmarks are before any arm is compared. cpu scale: the first 200 documents of each task (the runs fit two
CPU cores); gpu: every document. An evaluation already in <runs>/eval/<DIR name>-<weights hash>.json for the same tasks and
limit is reused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvshift.experiments.base import Experiment, RunOptions, write_summary
from kvshift.experiments.downstream import TASKS, _export_info, evaluation, task_rows, verdict
from kvshift.utils.provenance import provenance

LIMIT = {"cpu": 200, "gpu": None}
ORDER = ("source", "vanilla", "kvshift", "kshift")
CLAIM = ("Adding KV shifting to a pretrained Llama and continuing its training improves zero-shot benchmarks "
         "over continuing the same training without it.")


def _models(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in [s for it in items for s in it.split(",") if s.strip()]:
        if "=" not in item:
            raise ValueError(f"--input: expected NAME=DIR, got {item!r}")
        name, d = (x.strip() for x in item.split("=", 1))
        if name not in ORDER:
            raise ValueError(f"--input: NAME must be one of {ORDER}, got {name!r}")
        p = Path(d)
        if not (p.suffix == ".json" and p.is_file()) and not (p / "config.json").is_file():
            raise FileNotFoundError(f"--input {name}: {d} is neither a model directory (config.json) nor an "
                                    "evaluation .json")
        out[name] = p
    if "source" not in out:
        raise ValueError("--input: needs source=DIR (the converted pretrained model), then the arms when trained")
    return {k: out[k] for k in ORDER if k in out}


def above_chance(rows: dict, model: str) -> list[str]:
    """Tasks on which `model` is more than two standard errors above chance (LAMBADA: chance 0, any accuracy)."""
    return [t for t, r in rows.items() if r[model]["acc"] - (r["chance"] or 0.0) > 2 * r[model]["se"]]


def bench_verdict(rows: dict, models: dict) -> tuple[str, str]:
    """The claim compares the continued-training arms; without both vanilla and kvshift: inconclusive."""
    src = ", ".join(f"{t} {r['source']['acc']:.3f}±{r['source']['se']:.3f} (chance {r['chance']})"
                    for t, r in rows.items())
    up = above_chance(rows, "source")
    text = f"Source model: {src}; above chance on {len(up)}/{len(rows)} tasks."
    if not {"vanilla", "kvshift"} <= set(models):
        return "inconclusive", text + (" The continued-training arms (vanilla, kvshift) are not evaluated yet: "
                                       "the row cannot test the claim.")
    v, t = verdict(rows, "kvshift")
    return v, text + " " + t


def run(opts: RunOptions, out: Path) -> dict:
    if not opts.inputs:
        raise ValueError("upcycle-benchmarks needs the models: --input source=DIR [--input vanilla=DIR ...]")
    models = _models(opts.inputs)
    limit = LIMIT[opts.scale]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    evals = {m: evaluation(d, TASKS, limit, opts.runs / "eval", device=device, batch_size=32)
             for m, d in models.items()}
    rows = task_rows(evals, TASKS)
    summ = {"experiment": "upcycle-benchmarks", "scale": opts.scale, "paper": CLAIM, **provenance(),
            **({"note": opts.note} if opts.note else {}), "limit": limit,
            "models": {m: str(d) for m, d in models.items()},
            "exports": {m: _export_info(d) for m, d in models.items()},
            "evaluations": {m: {k: e.get(k) for k in ("model", "setup", "versions", "git_commit", "command",
                                                      "device_name")} for m, e in evals.items()},
            "tasks": rows}
    summ["verdict"], summ["verdict_text"] = bench_verdict(rows, models)
    out.mkdir(parents=True, exist_ok=True)
    write_summary(out, summ)
    _readme(summ, out / "README.md")
    return summ


def _readme(s: dict, path: Path) -> None:
    models = list(s["models"])
    arms = [m for m in models if m not in ("source", "vanilla")]
    lim = "every document" if s["limit"] is None else f"the first {s['limit']} documents"
    lines = ["# upcycle-benchmarks: the pretrained source model and the continued-training arms", "",
             f"Command: `{s['command']}`  ", f"Commit: `{s['git_commit']}` · device: {s['device']}", "",
             f"**Claim:** {s['paper']}", "", f"**Ours:** **{s['verdict']}** — {s['verdict_text']}", ""]
    if s.get("note"):
        lines += [f"*Note:* {s['note']}", ""]
    lines += [f"Zero-shot, lm-evaluation-harness with the offline task files of `kvshift eval`, {lim} of each task; "
              "accuracy (acc_norm for HellaSwag and ARC) ± binomial standard error; Δ against the vanilla arm, "
              "starred beyond twice the standard error of the difference.", "",
              "| task | n | chance | " + " | ".join(models) + "".join(f" | Δ {a}" for a in arms if "vanilla" in models) + " |",
              "|---|---|---|" + "---|" * (len(models) + (len(arms) if "vanilla" in models else 0))]
    for t, r in s["tasks"].items():
        cells = [f"{r[m]['acc']:.4f} ± {r[m]['se']:.4f}" for m in models]
        if "vanilla" in models:
            cells += [f"{r[a]['diff']:+.4f}{' *' if r[a]['significant'] else ''}" for a in arms]
        lines.append(f"| {t} ({r['metric']}) | {r['source']['n']} | {r['chance']} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines + [""]))


EXPERIMENTS = [
    Experiment(
        "upcycle-benchmarks", "Upcycling (beyond the paper)", CLAIM,
        "the source model's scores first (a task counts as above chance beyond two standard errors); then per task "
        "kvshift − vanilla after the same continued training, a difference counting beyond twice its standard "
        "error: reproduced when better on at least half the tasks and worse on none, partly when better on some "
        "and worse on none, not reproduced otherwise; inconclusive until both arms are evaluated.",
        "lm-eval benchmarks of SmolLM2-135M (source) and of the upcycle arms", run,
        options=("inputs", "note", "runs")),
]
