"""`kvshift bench`: vanilla vs the KV-shift arms, measured in one process.

Parts (default attn, generate, e2e; --only picks), each with the same settings for every arm:
  attn      the attention block forward + backward as a model runs it: the output gradient in the model's
            layout, one attention kernel family for every arm, synchronised / back-to-back / CUDA-graph
            timings and the profiler's kernel times (`kvshift.bench.attn`; supersedes block)
  generate  decoding through generate itself: kvshift.LM, KVShiftForCausalLM on a StaticCache (eager and
            compiled) and transformers' LlamaForCausalLM of the same shape (`kvshift.bench.generate`;
            supersedes decode)
  e2e       a full training step of a bench preset: torch.compile(model + loss), bf16 autocast,
            fused AdamW; tokens/s, MFU, peak memory (`kvshift.bench.e2e`)
The superseded parts, still run when named and still read from earlier results (no targets):
  block   the attention block forward + backward: q/k/v given as inputs, RoPE (+ K shift fused with
          RoPE and V shift for the shift arms) + SDPA (flash backend where it accepts the shape), once
          eager and once under torch.compile (where inductor fuses vanilla's RoPE too: the fair test)
          (`kvshift.bench.block`)
  decode  prefill a long context with the model's own cache, then greedy single-token steps (eager)
          (`kvshift.bench.decode`)

This module runs the parts and writes the result. Decode has no fused-sdpa / fused-flash arm (the decode
step is the same kernel). With --profile the e2e part also records each arm's top GPU kernels
(torch.profiler, 2 steps after the timing), and the generate part each arm's kernels of one decode step
(`kvshift.bench.profile.profile_decode`: generate(N new) minus generate(1 new), per token); a merge keeps them
with the arms.
Results go to <out>/<device-slug>.json and .md after every finished case, so a run cut short keeps
what it measured; with --only the other parts of an earlier result for the same device are kept.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from kvshift.bench.attn import bench_attn
from kvshift.bench.block import bench_block
from kvshift.bench.decode import bench_decode
from kvshift.bench.e2e import bench_e2e
from kvshift.bench.generate import bench_generate
from kvshift.bench.plan import PARTS, Plan, device_name, device_slug, fused_available, log
from kvshift.bench.report import CASES, GEN_RATIOS, compute_targets, ratio, render_markdown, target_summary
from kvshift.utils.provenance import provenance


def _triton_version() -> str | None:
    try:
        import triton  # optional dependency (kvshift[triton]): None when it is not installed
    except Exception:
        return None
    return triton.__version__


def bench_meta(device: torch.device, quick: bool) -> dict:
    """The result's meta: `kvshift.utils.provenance` with the bench's device name ("cpu" on a CPU, see
    `plan.device_name`) and the bench-only keys, in the order results have always had."""
    prov = provenance(device)
    name = device_name(device)
    return {
        "device": name, "device_slug": device_slug(name), "quick": quick,
        **{k: prov[k] for k in ("command", "git_commit", "kvshift", "torch")},
        "triton": _triton_version(), "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": prov["python"], "time_utc": prov["time_utc"], "cpu_threads": torch.get_num_threads(),
    }


_PROV = ("command", "time_utc", "git_commit")


def _load_previous(path: Path, meta: dict) -> tuple[dict, dict]:
    """Sections of an earlier result for the same device and mode (kept when --only re-runs others), and its
    meta."""
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}, {}
    pm = prev.get("meta", {})
    if pm.get("device") != meta["device"] or pm.get("quick") != meta["quick"]:
        return {}, {}
    return {p: prev[p] for p in PARTS if p in prev}, pm


def kept_part(part: str, sec: dict, prev_meta: dict) -> dict:
    """An earlier result's part that this run keeps, marked from_earlier_run, with measured_by: the run that
    measured it (or, from a merged file, the runs that hold it) for a later merge to name."""
    by = sec.get("measured_by")
    if by is None and prev_meta.get("merged_from"):
        by = [{k: m.get(k) for k in _PROV} for m in prev_meta["merged_from"] if part in m.get("parts", ())]
    elif by is None and not sec.get("from_earlier_run"):
        by = {k: prev_meta.get(k) for k in _PROV}
    return {**sec, "from_earlier_run": True, **({"measured_by": by} if by else {})}


def write_results(results: dict, out: Path) -> tuple[Path, Path]:
    results["targets"] = compute_targets(results)
    results["summary"] = target_summary(results["targets"])
    order = ("meta", *PARTS, "targets", "summary")
    ordered = {k: results[k] for k in order if k in results}
    results.clear()
    results.update(ordered)
    out.mkdir(parents=True, exist_ok=True)
    slug = results["meta"]["device_slug"]
    jp, mp = out / f"{slug}.json", out / f"{slug}.md"
    jp.write_text(json.dumps(results, indent=1) + "\n")
    mp.write_text(render_markdown(results))
    return jp, mp


def _union_arms(before: dict, case: dict) -> dict:
    """A generate case measured by two runs: the arms of both (the later run wins an arm both hold), the ratios
    recomputed; a ratio of two arms from different runs is marked in `cross_run_ratios`. `arm_runs` (arm -> the
    run that measured it) carries that through later merges; a mark of a case merged before `arm_runs` existed
    is kept while neither of its arms is replaced."""
    arms = {**before["arms"], **case["arms"]}
    runs = {**before["arm_runs"], **case["arm_runs"]}
    ok = {a: v.get("ms_per_token") for a, v in arms.items() if isinstance(v, dict) and "error" not in v}
    ratios = {k: ratio(ok.get(a), ok.get(b)) for k, (a, b) in GEN_RATIOS.items()}
    kept = {k for k in before.get("cross_run_ratios", ())
            if k in GEN_RATIOS and not set(GEN_RATIOS[k]) & set(case["arms"])}
    cross = sorted(kept | {k for k, (a, b) in GEN_RATIOS.items() if a in runs and b in runs and runs[a] != runs[b]})
    return {**before, **case, "arms": arms, "arm_runs": runs, "ratios": ratios,
            **({"cross_run_ratios": cross} if cross else {})}


def _tag_arm_runs(generate: dict, run_id: str) -> dict:
    """The part's cases with `arm_runs` (arm -> run_id) where a case does not name its arms' runs yet."""
    cases = {n: ({**c, "arm_runs": {a: run_id for a in c["arms"]}} if "arms" in c and "arm_runs" not in c else c)
             for n, c in generate.get("cases", {}).items()}
    return {**generate, "cases": cases}


def merge_results(paths: list[str | Path], out: str | Path) -> dict:
    """One result from several runs of the same device (parts run as separate processes on separate GPUs
    of one machine): each part's cases (block shapes, e2e models, decode batches) are the union over the
    files, a later file winning a case both hold; meta.merged_from lists the runs that measured them (a part
    a run kept from an earlier run into the same --out counts as that run's). One file alone is written again:
    its targets and markdown from its JSON, as the current report renders them."""
    if not paths:
        raise ValueError("--merge needs at least one result file (one alone: its markdown and targets written again)")
    runs = []
    for p in paths:
        try:
            runs.append((str(p), json.loads(Path(p).read_text())))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read bench result {p}: {e}") from e
    devices = {r["meta"].get("device") for _, r in runs}
    if len(devices) != 1 or len({r["meta"].get("quick") for _, r in runs}) != 1:
        raise ValueError(f"the results come from different devices or modes: {sorted(map(str, devices))}")
    meta = dict(runs[0][1]["meta"])
    meta["merged_from"] = []
    sources = []  # (merged_from entries, {part: section}) in order: a file's earlier parts before its own
    key = lambda m: (m.get("command"), m.get("time_utc"))  # noqa: E731
    # the runs that the files measured themselves (a file merged before lists its own sources)
    measured = {key(m) for _, r in runs for m in (r["meta"].get("merged_from") or [r["meta"]])}
    for p, r in runs:
        def src(m: dict, parts: list[str], name: str = Path(p).name) -> dict:
            return {"file": name, **{k: m.get(k) for k in _PROV}, "parts": parts}

        # a part kept from an earlier run into the same --out (bench.sh twice in one job) names that run (or
        # the runs of a merged file); it is merged as theirs, unless one of the files merged here is that run
        for k in PARTS:
            by = r.get(k, {}).get("measured_by") if r.get(k, {}).get("from_earlier_run") else None
            by = [by] if isinstance(by, dict) else by or []
            if by and not all(key(m) in measured for m in by):
                sources.append(([src(m, [k]) for m in by], {k: r[k]}))
        own = [k for k in PARTS if k in r and not r[k].get("from_earlier_run")]
        sources.append((r["meta"].get("merged_from") or [src(r["meta"], own)], {k: r[k] for k in own}))
    results: dict = {"meta": meta}
    cases = CASES
    for i, (entries, parts) in enumerate(sources):
        meta["merged_from"] += entries
        r = {k: {x: y for x, y in v.items() if x not in ("from_earlier_run", "measured_by")} for k, v in parts.items()}
        if "generate" in r:  # which run measured each arm: its time, or (a merged file, no time) the source
            one = entries[0] if len(entries) == 1 else {}
            run_id = one.get("time_utc") or f"source {i} ({entries[0].get('file')})"
            r["generate"] = _tag_arm_runs(r["generate"], run_id)
        for part in PARTS:
            if part in r:
                if part in results:  # the same part from several runs (e.g. one e2e model per GPU): union of cases
                    merged = {**results[part][cases[part]], **r[part].get(cases[part], {})}
                    if part == "generate":  # one case's arms may come from several runs (eager / compiled ones)
                        for name, case in r[part].get(cases[part], {}).items():
                            before = results[part][cases[part]].get(name)
                            if before and "arms" in before and "arms" in case:
                                merged[name] = _union_arms(before, case)
                    results[part] = {**r[part], cases[part]: merged}
                else:
                    results[part] = r[part]
    write_results(results, Path(out))
    return results


def run_bench(plan: Plan, out: str | Path, *, device: torch.device | None = None) -> dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unknown = set(plan.parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown bench parts {sorted(unknown)}; choose from {PARTS}")
    out = Path(out)
    torch.set_float32_matmul_precision("high")
    meta = bench_meta(device, plan.quick)
    meta["plan"] = asdict(plan)
    meta["fused_available"] = fused_available()
    results: dict = {"meta": meta}
    previous, prev_meta = _load_previous(out / f"{meta['device_slug']}.json", meta)
    for p, sec in previous.items():
        if p not in plan.parts:
            results[p] = kept_part(p, sec, prev_meta)

    def save(update: dict) -> None:
        results.update(update)
        write_results(results, out)

    runners = {"attn": bench_attn, "generate": bench_generate, "block": bench_block, "e2e": bench_e2e,
               "decode": bench_decode}
    for part in ("attn", "block", "decode", "generate", "e2e"):  # the long compile-bound parts last
        if part in plan.parts:
            t0 = time.perf_counter()
            results[part] = runners[part](plan, device, save)
            results[part]["wall_s"] = time.perf_counter() - t0
            save({})
            log(f"{part} done in {results[part]['wall_s']:.0f}s")
    write_results(results, out)
    return results
