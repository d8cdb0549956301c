"""What the upcycled model's heads do before and after continued training: the shift coefficients' movement
from the identity and the induction and previous-token heads.

`kvshift.eval.analysis` scores every head on repeated random tokens (8 rows of 64 distinct tokens, twice, after
the model's BOS): prefix matching (attention from the second copy's token to the token after its first
occurrence: the induction pattern) and previous token. The source model is analysed once per experiment
directory (source-analysis.json), every run's final checkpoint into its analysis.json (published with the run).
"""

from __future__ import annotations

import json
from pathlib import Path

HEAD_SCORE = 0.3
MOVED_SHARE = 0.1
ANALYSIS = dict(n=64, batch=8, seed=0)


def bos_id(path: Path) -> int | None:
    """The BOS id of a model directory or of a training checkpoint's model config (None when it has none)."""
    for cand in (path / "config.json", path / "model_config.json"):
        if cand.is_file():
            bos = json.loads(cand.read_text()).get("bos_token_id")
            if isinstance(bos, int):
                return bos
    return None


def head_report(model_path: str | Path, bos: int | None) -> dict:
    """Per-head scores (layers x heads) of a model directory or checkpoint, compact (no shift table: the
    run's coefficients.jsonl has it)."""
    from kvshift.eval.analysis import analyze, load_for_analysis

    rep = analyze(load_for_analysis(model_path), prefix=bos, **ANALYSIS)
    return {k: rep[k] for k in ("n", "batch", "seed", "prefix_token", "scores", "max")}


def write_report(model_path: str | Path, dst: Path, bos: int | None = None) -> dict:
    from kvshift.utils.io import write_text_atomic

    bos = bos_id(Path(model_path)) if bos is None else bos
    rep = head_report(model_path, bos)
    write_text_atomic(dst, json.dumps(rep) + "\n")
    return rep


def source_report(out: Path, model: Path, log=print) -> None:
    """The source model's heads, once per experiment directory (the arms all start from it)."""
    dst = out / "source-analysis.json"
    if not dst.is_file():
        log(f"[upcycle] head analysis of the source model {model}")
        write_report(model, dst)


def counts(rep: dict | None) -> dict | None:
    """{"induction_heads", "previous_token_heads": heads scoring >= HEAD_SCORE, "heads", "max_prefix_matching",
    "mean_prefix_matching"} of a report (None without one)."""
    if not rep:
        return None
    pm = [x for row in rep["scores"]["prefix_matching"] for x in row]
    pt = [x for row in rep["scores"]["previous_token"] for x in row]
    return {"induction_heads": sum(x >= HEAD_SCORE for x in pm), "previous_token_heads": sum(x >= HEAD_SCORE for x in pt),
            "heads": len(pm), "max_prefix_matching": max(pm), "mean_prefix_matching": sum(pm) / len(pm)}


def read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def coefficient_movement(layers: list[dict]) -> dict:
    """Per layer, KV heads whose previous-token share (|c2| / (|c1| + |c2|)) is >= MOVED_SHARE, for keys (alpha)
    and values (beta), and the largest distance of any coefficient from the identity."""
    per, dmax = [], 0.0
    for L in layers:
        row = {}
        for key, side in (("alpha", "k"), ("beta", "v")):
            heads = L[key]
            shares = [abs(h[1]) / max(abs(h[0]) + abs(h[1]), 1e-12) for h in heads]
            row[f"{side}_heads_moved"] = sum(s >= MOVED_SHARE for s in shares)
            row[f"{side}_max_share"] = max(shares)
            dmax = max(dmax, max(abs(h[0] - 1) for h in heads), max(abs(x) for h in heads for x in h[1:]))
        per.append(row)
    return {"per_layer": per, "k_heads_moved": sum(r["k_heads_moved"] for r in per),
            "v_heads_moved": sum(r["v_heads_moved"] for r in per), "heads": sum(len(L["alpha"]) for L in layers),
            "max_abs_change": dmax}
