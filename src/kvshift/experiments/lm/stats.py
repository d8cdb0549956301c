"""Numbers of the language-model experiments, as pure functions of published runs: per-part statistics,
power-law fits, the Table 4 head counts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from kvshift.experiments.lm.spec import Part
from kvshift.train.compare import summarize as compare_summary
from kvshift.train.plot import curves
from kvshift.utils.provenance import command_line, provenance


def fit_power_law(n: list[float], loss: list[float], offset: bool = False) -> dict:
    """Least-squares fit of L = a * N^-b (log-linear: log L = log a - b log N) or, with `offset`,
    L = a * N^-b + c (c on a grid over [0, min L), log-linear fit of L - c for each, the c with the
    smallest squared error in L kept). Returns a, b, c, rmse (in L) and n."""
    x, y = np.log(np.asarray(n, float)), np.asarray(loss, float)
    if x.size < (4 if offset else 2):
        raise ValueError(f"need at least {4 if offset else 2} points to fit, got {x.size}")

    def fit(c):
        b1, b0 = np.polyfit(x, np.log(y - c), 1)
        pred = np.exp(b0) * np.exp(x * b1) + c
        return float(np.exp(b0)), float(-b1), float(np.sqrt(np.mean((pred - y) ** 2)))

    cs = np.linspace(0.0, y.min() * (1 - 1e-3), 2000) if offset else [0.0]
    best = min(((c, *fit(c)) for c in cs), key=lambda t: t[3])
    return {"a": best[1], "b": best[2], "c": float(best[0]), "rmse": best[3], "n": int(x.size),
            "form": "L = a*N^-b + c" if offset else "L = a*N^-b"}


def coefficient_table(layers: list[dict]) -> dict:
    """Table 4: KV heads (all layers) counted by (alpha1 > alpha2) x (beta1 > beta2), with alpha1/beta1
    the current-token and alpha2/beta2 the previous-token coefficient; plus the diagonal share."""
    t = {"a1>a2,b1>b2": 0, "a1>a2,b1<=b2": 0, "a1<=a2,b1>b2": 0, "a1<=a2,b1<=b2": 0}
    for layer in layers:
        for a, b in zip(layer["alpha"], layer["beta"]):
            t[f"a1{'>' if a[0] > a[1] else '<='}a2,b1{'>' if b[0] > b[1] else '<='}b2"] += 1
    n = sum(t.values())
    diag = t["a1>a2,b1>b2"] + t["a1<=a2,b1<=b2"]
    # one-sided binomial p-value of at least `diag` same-side heads if sides were independent fair coins
    p = sum(math.comb(n, k) for k in range(diag, n + 1)) / 2 ** n if n else None
    return {"counts": t, "heads": n, "diagonal": diag, "diagonal_fraction": diag / n if n else None, "p_value": p}


def coefficient_values(layers: list[dict]) -> dict[str, list[float]]:
    """Flat lists alpha1, alpha2, beta1, beta2 over every KV head of every layer."""
    out = {"alpha1": [], "alpha2": [], "beta1": [], "beta2": []}
    for layer in layers:
        for a, b in zip(layer["alpha"], layer["beta"]):
            out["alpha1"].append(a[0]); out["alpha2"].append(a[1])  # noqa: E702
            out["beta1"].append(b[0]); out["beta2"].append(b[1])  # noqa: E702
    return out


def below_fraction(base: list[tuple[float, float]], arm: list[tuple[float, float]], skip: float = 0.1) -> float | None:
    """Share of the evaluations both curves have, past the first `skip` of the tokens, at which the arm's
    loss is below the baseline's."""
    b, a = dict(base), dict(arm)
    xs = sorted(set(a) & set(b))
    xs = [x for x in xs if xs and x > skip * xs[-1]]
    return sum(a[x] < b[x] for x in xs) / len(xs) if xs else None


# ---- summaries ----------------------------------------------------------------------------------
def published_runs(out: Path, part: Part) -> dict[str, dict[int, Path]]:
    """arm -> seed -> published run dir, in the part's arm order (the baseline first)."""
    runs: dict[str, dict[int, Path]] = {}
    for arm in part.arms:
        for d in sorted((out / "runs" / part.name).glob(f"{arm}-s*")):
            tail = d.name[len(arm) + 2:]
            if tail.isdigit() and (d / "summary.json").is_file():
                runs.setdefault(arm, {})[int(tail)] = d
    return runs


def part_stats(runs: dict[str, dict[int, Path]]) -> dict:
    """kvshift.train.compare.summarize plus epochs, params, throughput and the 'below throughout' share."""
    res = compare_summary(runs)
    base = res["baseline"]
    for arm, by_seed in runs.items():
        for seed, rd in by_seed.items():
            s = json.loads((rd / "summary.json").read_text())
            r = res["runs"][arm][str(seed)]
            mc = s.get("model_config") or {}
            r.update(epochs=s.get("epochs"), steps=s.get("steps"), non_embedding_params=s.get("non_embedding_params"),
                     n_heads=mc.get("n_heads"), n_kv_heads=mc.get("n_kv_heads"), mfu=s.get("mfu"),
                     device=s.get("device_name"))
            r["run_dir"] = str(Path(*rd.parts[-3:]))
            if arm != base and seed in runs.get(base, {}) and arm in res["per_seed"].get(str(seed), {}):
                res["per_seed"][str(seed)][arm]["below_fraction"] = below_fraction(
                    curves(runs[base][seed])["val"], curves(rd)["val"])
    return res


def summary_provenance(all_runs: list[Path]) -> dict:
    p = provenance()
    infos = [json.loads((d / "run.json").read_text()) for d in all_runs if (d / "run.json").is_file()]
    uniq = lambda xs: "; ".join(dict.fromkeys(str(x) for x in xs if x)) or None  # noqa: E731
    if infos:
        p.update({k: uniq(i["provenance"][k] for i in infos) for k in ("git_commit", "device", "torch")},
                 command=uniq(i["command"] for i in infos), time_utc=max(i["provenance"]["time_utc"] for i in infos))
        toks = {}  # tokenizer build -> parts/arms that used it
        for d, i in zip([d for d in all_runs if (d / "run.json").is_file()], infos):
            sha = ((i.get("key") or {}).get("data") or {}).get("tokenizer_sha256")
            toks.setdefault(str(sha)[:16], []).append(f"{d.parent.name}/{d.name}")
        if len(toks) > 1:  # the corpus was rebuilt between runs: say so wherever the summary is read
            p["note"] = ("These runs used " + str(len(toks)) + " builds of the corpus and tokenizer (the data was "
                         "rebuilt between them; results/corpus says what changed): " + "; ".join(
                             f"tokenizer {k}… for {', '.join(v)}" for k, v in toks.items()) + ".")
    p["summarized_by"] = command_line()
    return p


def fmt(x, spec=".4f", none="—") -> str:
    return none if x is None else format(x, spec)


def si(x: float) -> str:
    """262144000 -> '262M', 10240 -> '10k'."""
    for div, suf in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suf}"
    return f"{x:.3g}"


def mean_diff(st: dict, arm: str):
    return st["aggregate"].get(arm, {}).get("diff", {}).get("mean")


def first_run(st: dict, arm: str) -> dict:
    return next(iter(st["runs"][arm].values()))


