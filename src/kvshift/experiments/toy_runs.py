"""Published runs of the toy experiments: each (arm, seed) writes out/runs/<arm>-s<seed>.json (+ its records),
and the summary is built from every run published there. Jobs split by --seeds or --arms (one per GPU, or one
per device call) therefore merge by copying their results into one tree, and `--summarize` rebuilds the
summary without training."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from kvshift.experiments.arms import THRESHOLDS, steps_to
from kvshift.experiments.base import ResultsLog
from kvshift.utils.io import read_json, read_jsonl, write_json_atomic, write_text_atomic

RUNS = "runs"


def publish(out: Path, arm: str, seed: int, record: dict, records: list[dict]) -> None:
    """One finished arm of one seed: its summary row and its training/evaluation records (`eval` marks the
    evaluations: a record's own flag, else whether it has an accuracy)."""
    rd = out / RUNS
    rd.mkdir(parents=True, exist_ok=True)
    # the records first: a summary built meanwhile (a parallel job) never sees a run without its records
    write_text_atomic(rd / f"{arm}-s{seed}.metrics.jsonl",
                      "".join(json.dumps({**r, "arm": arm, "seed": seed, "eval": r.get("eval", "accuracy" in r)}) + "\n"
                              for r in records))
    write_json_atomic(rd / f"{arm}-s{seed}.json", {**record, "arm": arm, "seed": seed})


def _json(d):
    return json.loads(json.dumps(d))  # tuples as a published record holds them: lists


def _model(d: dict) -> dict:
    """A model record with the defaults of options added since it was written (an unknown key: as it is)."""
    from kvshift.models import ModelConfig
    try:
        return _json(ModelConfig.from_dict(d).to_dict())
    except (TypeError, ValueError):
        return d


def eval_fingerprint(*tensors) -> str:
    """A short hash of an evaluation set. The set is drawn (at a fixed seed) by the sampler that also draws the
    training stream, so equal fingerprints mean the same task parameters and the same generator code."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def same_run(rec: dict, setting: dict) -> bool:
    """Whether a published record was made with this setting: {"train": …, "model": …, "device": …,
    "eval_fingerprint": …, and any further record key that must match, e.g. "n_eval_sequences" or "depth"}.
    A record from before fingerprints were recorded has none: it matches on the rest, trusting the caller's
    named sources to share the task's code (their settings are the same dicts; tests compare them)."""
    want = _json(setting)
    for k, v in want.items():
        if k == "eval_fingerprint" and k not in rec:
            continue
        got = rec.get("provenance", {}).get("device") if k == "device" else rec.get(k)
        if k == "model":
            got, v = _model(got or {}), _model(v)
        if got != v:
            return False
    return True


def find_run(dirs: list[Path], name: str, setting: dict) -> tuple[Path, dict] | None:
    """(path, record) of the first dirs/<name>.json published with this setting, with its records beside it;
    None when there is none. dirs are other experiments' runs folders: a run there counts only where that
    experiment trains the same task with the same data stream and evaluation set (the caller names them)."""
    for d in dirs:
        f = Path(d) / f"{name}.json"
        if f.is_file() and f.with_suffix(".metrics.jsonl").is_file():
            try:
                rec = read_json(f)
            except (OSError, ValueError):
                continue
            if same_run(rec, setting):
                return f, rec
    return None


def adopt(found: tuple[Path, dict], dst_dir: Path, name: str, **fields) -> None:
    """Copies a run `find_run` found (the record it checked, and its records) to dst_dir/<name>.json, noting
    where it came from: the records first, so that a summary built meanwhile never sees a run without them."""
    src, rec = found
    parts = src.parts
    at = len(parts) - 1 - parts[::-1].index(RUNS) if RUNS in parts else len(parts) - 1
    rec = {**rec, **fields, "adopted_from": "/".join(parts[max(0, at - 1):])}  # <experiment>/runs/…
    dst_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(dst_dir / f"{name}.metrics.jsonl", src.with_suffix(".metrics.jsonl").read_text())
    write_json_atomic(dst_dir / f"{name}.json", rec)


def copy_from(src_dirs: list[Path], dst_dir: Path, name: str, setting: dict, log, **fields) -> bool:
    """Copies the run `name` from the first of src_dirs that published it with `setting` (find_run) into
    dst_dir; False when none did."""
    found = find_run(src_dirs, name, setting)
    if found is None:
        return False
    adopt(found, dst_dir, name, **fields)
    log(f"[{name}] the same run is published in {found[0]}; copied, not trained")
    return True


def arm_summary(arm, run: dict) -> dict:
    """A finished arm's result row (arm: experiments.arms.Arm; run: train_arm's return)."""
    s, recs = run["summary"], run["records"]
    evals = [r for r in recs if "accuracy" in r]
    final = s["final_eval"] or {}
    out = {"arm": arm.name, "model": arm.config.to_dict(), "non_embedding_params": s["non_embedding_params"],
           "final_accuracy": final.get("accuracy"), "best_accuracy": max(r["accuracy"] for r in evals),
           "final_target_loss": final.get("target_loss"), "steps_to": steps_to(evals),
           "wall_seconds": s["wall_time_s"], "diverged_at": s["diverged_step"], **arm.extra}
    coefs = [r["coefficients"] for r in recs if "coefficients" in r]
    if arm.config.shifted and coefs:
        out["final_coefficients"] = coefs[-1]
    return out


def published(out: Path) -> list[dict]:
    """Every published run, ordered by seed then in the order the arms were defined (their `order`)."""
    runs = [read_json(f) for f in sorted((out / RUNS).glob("*-s*.json"))]
    return sorted(runs, key=lambda r: (r["seed"], r.get("order", 0)))


def merged_provenance(runs: list[dict]) -> dict:
    """The first run's provenance, with the commits, devices, torch versions and commands of all the runs
    (each distinct value once, joined by "; "): a summary built from runs made by several jobs names them all."""
    return {**runs[0]["provenance"], **{k: "; ".join(dict.fromkeys(str(r["provenance"].get(k)) for r in runs))
                                        for k in ("git_commit", "device", "torch", "command")}}


def check_same_setting(runs: list[dict], out: Path) -> None:
    """Runs of one summary must share the training setting, and every run of an arm its model: a run left from
    another setting is refused by name instead of being averaged in."""
    first = runs[0]
    models = {}
    for r in runs:
        if r["train"] != first["train"]:
            raise ValueError(f"{out / RUNS}: {r['arm']}-s{r['seed']} was trained with {r['train']}, but "
                             f"{first['arm']}-s{first['seed']} with {first['train']}; move the older runs away")
        m = models.setdefault(r["arm"], _model(r["model"]))
        if _model(r["model"]) != m:  # a copied run may predate options added since (their defaults)
            raise ValueError(f"{out / RUNS}: the runs of arm {r['arm']} have different models; move the older "
                             "runs away")


def collect(out: Path) -> tuple[list[dict], dict]:
    """(per_seed, arms) from the published runs, in the layout the toy summaries use; also rewrites
    out/metrics.jsonl from the runs' records (for the plots)."""
    runs = published(out)
    if not runs:
        raise ValueError(f"{out}: no published runs yet")
    check_same_setting(runs, out)
    per_seed: dict[int, dict] = {}
    for r in runs:
        s = per_seed.setdefault(r["seed"], {"seed": r["seed"], "data_generation_seconds": r["data_generation_seconds"],
                                            "arms": {}})
        s["arms"][r["arm"]] = r["result"]
    log = ResultsLog(out)
    for r in runs:
        for x in read_jsonl(out / RUNS / f"{r['arm']}-s{r['seed']}.metrics.jsonl"):
            log.log(x)
    log.close()
    per_seed_list = [per_seed[k] for k in sorted(per_seed)]
    return per_seed_list, aggregate(per_seed_list)


def aggregate(per_seed: list[dict]) -> dict:
    """Per arm across the seeds that ran it: mean final/best accuracy, and each threshold's crossing steps
    (all seeds' values, and their median, a seed that never crossed counting as never)."""
    names = list(dict.fromkeys(n for s in per_seed for n in s["arms"]))
    out = {}
    for n in names:
        rows = [s["arms"][n] for s in per_seed if n in s["arms"]]
        seeds = [s["seed"] for s in per_seed if n in s["arms"]]
        steps = {}
        for th in THRESHOLDS:
            vals = [r["steps_to"][str(th)] for r in rows]
            got = sorted(v for v in vals if v is not None)
            # the (upper) median over every seed, one that never got there counting as never (None)
            med = sorted(math.inf if v is None else v for v in vals)[len(vals) // 2]
            steps[str(th)] = {"reached": f"{len(got)}/{len(vals)}", "median_step": None if med == math.inf else med,
                              "per_seed": dict(zip(map(str, seeds), vals))}
        out[n] = {
            "final_accuracy": sum(r["final_accuracy"] for r in rows) / len(rows),
            "final_accuracy_per_seed": [r["final_accuracy"] for r in rows],
            "seeds": seeds,
            "best_accuracy": sum(r["best_accuracy"] for r in rows) / len(rows),
            "steps_to": steps,
            "non_embedding_params": rows[0]["non_embedding_params"],
            "wall_seconds": sum(r["wall_seconds"] for r in rows),
        }
    return out


def crossing_ratios(arms: dict, slow: str, fast: str, threshold: str) -> dict | None:
    """Per seed where both arms crossed `threshold`: steps(slow) / steps(fast); None when no seed has both."""
    a, b = arms.get(slow), arms.get(fast)
    if a is None or b is None:
        return None
    sa, sb = a["steps_to"][threshold]["per_seed"], b["steps_to"][threshold]["per_seed"]
    per = {s: sa[s] / sb[s] for s in sa if s in sb and sa[s] is not None and sb[s]}
    if not per:
        return None
    v = sorted(per.values())
    return {"per_seed": per, "median": v[len(v) // 2], "min": v[0], "max": v[-1], "n": len(v)}


# a lower bound on the speed-up is stated only when it is at least this large
MIN_SPEED_BOUND = 4.0


def speed_lower_bound(summ: dict) -> str | None:
    """Where vanilla 2-layer never reached 50% in any of its (>= 2) seeds while KV shift 1-layer reached 90% in
    every one of its (>= 2) seeds early enough that steps / (its latest crossing) >= MIN_SPEED_BOUND: the text
    of a lower bound on the speed-up (the part of the claim the run can test), else None."""
    steps, batch = summ["train"]["steps"], summ["train"]["batch_size"]
    kv, v2 = summ["arms"]["kvshift-1L"]["steps_to"], summ["arms"]["vanilla-2L"]["steps_to"]
    kv90 = list(kv["0.9"].get("per_seed", {}).values())
    v50 = list(v2["0.5"].get("per_seed", {}).values())
    if len(kv90) < 2 or len(v50) < 2 or any(s is None for s in kv90) or any(s is not None for s in v50):
        return None
    bound = steps / max(kv90)
    if bound < MIN_SPEED_BOUND:
        return None
    return (f" Vanilla 2-layer (RoPE, the paper's setting) stayed below 50% for all {steps} steps "
            f"({steps * batch:,} sequences, the budget reached) in each of its {len(v50)} seeds, while KV shift "
            f"1-layer passed 90% by step {max(kv90)} in each of its {len(kv90)} seeds: in this setting KV shift "
            f"learns induction at least {bound:.1f}× faster, a lower bound only. The ratio itself, and vanilla "
            "2-layer reaching ~100% (the paper, at 4,096 sequences per step), lie beyond this budget.")


def has_runs(out: Path) -> bool:
    return any(Path(out, RUNS).glob("*-s*.json"))
