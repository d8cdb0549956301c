"""upcycle-benchmarks: zero-shot lm-eval scores of the pretrained source model (SmolLM2-135M converted with
the identity shift, `kvshift convert-llama`) and of each `upcycle` arm after continued training.

    kvshift experiment upcycle-benchmarks --scale cpu|gpu --input source=DIR [--input vanilla-s0=DIR
        --input kvshift-s0=DIR --input vanilla-s1=DIR --input kvshift-s1=DIR --input kshift-s0=DIR ...]

(an arm without `-sN` is its seed 0). Each arm is compared with the vanilla arm of the same seed (the same data
order); the verdict needs both arms in 2 seeds.

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
from kvshift.experiments.upcycle import ARMS
from kvshift.utils.provenance import provenance

LIMIT = {"cpu": 200, "gpu": None}
ORDER = ("source", *ARMS)
CLAIM = ("Adding KV shifting to a pretrained Llama and continuing its training improves zero-shot benchmarks "
         "over continuing the same training without it.")


def _label(name: str) -> tuple[str, int | None]:
    """'source' -> ('source', None); 'kvshift' -> ('kvshift', 0); 'kvshift-s1' -> ('kvshift', 1)."""
    arm, sep, seed = name.rpartition("-s")
    if sep and arm in ORDER[1:] and seed.isdigit():
        return arm, int(seed)
    if name not in ORDER:
        raise ValueError(f"--input: NAME must be one of {ORDER} (an arm optionally with its seed, e.g. "
                         f"kvshift-s1), got {name!r}")
    return name, (None if name == "source" else 0)


def _models(items: list[str]) -> dict[str, Path]:
    """NAME=DIR inputs -> {label: path} ordered source, then per seed vanilla, kvshift, kshift; a plain arm name
    is its seed 0 (label 'kvshift-s0')."""
    out = {}
    for item in [s for it in items for s in it.split(",") if s.strip()]:
        if "=" not in item:
            raise ValueError(f"--input: expected NAME=DIR, got {item!r}")
        name, d = (x.strip() for x in item.split("=", 1))
        arm, seed = _label(name)
        p = Path(d)
        if not (p.suffix == ".json" and p.is_file()) and not (p / "config.json").is_file():
            raise FileNotFoundError(f"--input {name}: {d} is neither a model directory (config.json) nor an "
                                    "evaluation .json")
        label = arm if seed is None else f"{arm}-s{seed}"
        if label in out:
            raise ValueError(f"--input: {label} given twice")
        out[label] = p
    if "source" not in out:
        raise ValueError("--input: needs source=DIR (the converted pretrained model), then the arms when trained")
    key = lambda k: (-1, -1) if k == "source" else (_label(k)[1], ORDER.index(_label(k)[0]))  # noqa: E731
    return {k: out[k] for k in sorted(out, key=key)}


def seeds_of(models) -> list[int]:
    """The seeds at which both vanilla and kvshift were evaluated."""
    return sorted(s for s in {_label(m)[1] for m in models if m != "source"}
                  if f"vanilla-s{s}" in models and f"kvshift-s{s}" in models)


def above_chance(rows: dict, model: str) -> list[str]:
    """Tasks on which `model` is more than two standard errors above chance (LAMBADA: chance 0, any accuracy)."""
    return [t for t, r in rows.items() if r[model]["acc"] - (r["chance"] or 0.0) > 2 * r[model]["se"]]


def seed_rows(rows: dict, seed: int) -> dict:
    """One seed's rows with its arms under their plain names (vanilla, kvshift, ...) for `downstream.verdict`."""
    out = {}
    for t, r in rows.items():
        row = {k: v for k, v in r.items() if k in ("chance", "metric")}
        for m, v in r.items():
            if isinstance(v, dict) and m != "source" and _label(m)[1] == seed:
                row[_label(m)[0]] = v
        out[t] = row
    return out


def bench_verdict(rows: dict, models: dict) -> tuple[str, str]:
    """Per seed, kvshift − vanilla on every task (`downstream.verdict`'s counts). Reproduced: every seed better
    on at least half the tasks above chance and worse on none; partly: no seed worse on any task and some seed
    better on one; not reproduced: some seed worse on a task; inconclusive: no task differs in any seed, or
    fewer than 2 seeds of both arms (one seed's differences are reported, not judged: the arms' own
    seed-to-seed spread is unknown)."""
    src = ", ".join(f"{t} {r['source']['acc']:.3f}±{r['source']['se']:.3f} (chance {r['chance']})"
                    for t, r in rows.items())
    up = above_chance(rows, "source")
    text = f"Source model: {src}; above chance on {len(up)}/{len(rows)} tasks."
    seeds = seeds_of(models)
    if not seeds:
        return "inconclusive", text + (" The continued-training arms (vanilla, kvshift) are not evaluated yet: "
                                       "the row cannot test the claim.")
    per = {s: verdict(seed_rows(rows, s), "kvshift") for s in seeds}
    text += " " + " ".join(f"Seed {s}: {t}" for s, (_, t) in per.items())
    if len(seeds) < 2:
        return "inconclusive", text + (f" Only seed {seeds[0]} of both arms is evaluated; the rule needs 2 seeds.")
    worse = any(r["kvshift"]["significant"] and r["kvshift"]["diff"] < 0
                for s in seeds for r in seed_rows(rows, s).values())
    better = any(r["kvshift"]["significant"] and r["kvshift"]["diff"] > 0
                 for s in seeds for r in seed_rows(rows, s).values())
    if worse:
        return "not reproduced", text
    if not better:  # no seed separates the arms on any task: nothing against a gain below the 2-SE margins
        return "inconclusive", text + " No task differs beyond 2 standard errors in any seed: the runs cannot separate the arms."
    return ("reproduced" if all(x == "reproduced" for x, _ in per.values()) else "partly reproduced"), text


def _rows(evals: dict) -> dict:
    """task_rows per seed (each arm against the vanilla arm of its seed), merged under the models' labels."""
    rows = task_rows({"source": evals["source"]}, TASKS, base_arm="none")
    for s in sorted({_label(m)[1] for m in evals if m != "source"}):
        mine = {m: e for m, e in evals.items() if m != "source" and _label(m)[1] == s}
        base = f"vanilla-s{s}"
        sr = task_rows(mine, TASKS, base_arm=base)
        for t, r in sr.items():
            rows[t].update({m: v for m, v in r.items() if m in mine})
    return rows


def run(opts: RunOptions, out: Path) -> dict:
    if not opts.inputs:
        raise ValueError("upcycle-benchmarks needs the models: --input source=DIR [--input vanilla=DIR ...]")
    models = _models(opts.inputs)
    limit = LIMIT[opts.scale]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    evals = {m: evaluation(d, TASKS, limit, opts.runs / "eval", device=device, batch_size=32)
             for m, d in models.items()}
    rows = _rows(evals)
    summ = {"experiment": "upcycle-benchmarks", "scale": opts.scale, "paper": CLAIM, **provenance(),
            **({"note": opts.note} if opts.note else {}), "limit": limit,
            "models": {m: str(d) for m, d in models.items()}, "seeds": seeds_of(models),
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
    arms = [m for m in models if m != "source" and not m.startswith("vanilla")]
    lim = "every document" if s["limit"] is None else f"the first {s['limit']} documents"
    lines = ["# upcycle-benchmarks: the pretrained source model and the continued-training arms", "",
             f"Command: `{s['command']}`  ", f"Commit: `{s['git_commit']}` · device: {s['device']}", "",
             f"**Claim:** {s['paper']}", "", f"**Ours:** **{s['verdict']}** — {s['verdict_text']}", ""]
    if s.get("note"):
        lines += [f"*Note:* {s['note']}", ""]
    lines += [f"Zero-shot, lm-evaluation-harness with the offline task files of `kvshift eval`, {lim} of each task; "
              "accuracy (acc_norm for HellaSwag and ARC) ± binomial standard error; Δ against the vanilla arm "
              "of the same seed, starred beyond twice the standard error of the difference (marked p: the paired "
              "standard error over the documents, where both evaluations keep per-document results; else that of "
              "two independent samples).", "",
              "| task | n | chance | " + " | ".join(models) + "".join(f" | Δ {a}" for a in arms) + " |",
              "|---|---|---|" + "---|" * (len(models) + len(arms))]
    for t, r in s["tasks"].items():
        cells = [f"{r[m]['acc']:.4f} ± {r[m]['se']:.4f}" for m in models]
        cells += [f"{r[a]['diff']:+.4f}{' *' if r[a]['significant'] else ''}{' p' if r[a].get('paired') else ''}"
                  if "diff" in r[a] else "–"
                  for a in arms]
        lines.append(f"| {t} ({r['metric']}) | {r['source']['n']} | {r['chance']} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines + [""]))


EXPERIMENTS = [
    Experiment(
        "upcycle-benchmarks", "Upcycling (beyond the paper)", CLAIM,
        "the source model's scores first (a task counts as above chance beyond two standard errors); then per seed "
        "and task kvshift − vanilla after the same continued training, a difference counting beyond twice its "
        "standard error: reproduced when every seed is better on at least half the tasks above chance and worse on "
        "none, partly when no seed is worse on any task and some seed better on one, not reproduced when a seed is "
        "worse on a task; inconclusive when no task differs in any seed (the runs cannot separate the arms) or "
        "with fewer than 2 seeds of both arms evaluated.",
        "lm-eval benchmarks of SmolLM2-135M (source) and of the upcycle arms", run,
        options=("inputs", "note", "runs")),
]
