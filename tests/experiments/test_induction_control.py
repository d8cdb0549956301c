"""The induction-control experiment: a tiny run writes its files, and the verdict's rule on synthetic runs."""

import json

import pytest

from kvshift.experiments import induction_control as ic
from kvshift.experiments.base import VERDICTS, RunOptions
from kvshift.experiments.cli import run_experiment
from kvshift.experiments.toy_runs import aggregate, crossing_ratios

TINY = dict(vocab=64, seq=24, segment=8, dim=16, heads=2, ffn=32, batch=4, steps=6, lr=1e-3, warmup=2,
            eval_every=3, n_eval=8, compile=False, bf16=False)


def test_a_tiny_run_writes_every_file_with_the_three_arms(monkeypatch, tmp_path):
    monkeypatch.setitem(ic.CONTROL, "cpu", dict(TINY))
    out = tmp_path / "ctl"
    opts = RunOptions(out=out, runs=tmp_path / "runs", seeds=[0], log=lambda m: None)
    summary = run_experiment("induction-control", opts)
    for f in ("metrics.jsonl", "summary.json", "plot.png", "README.md"):
        assert (out / f).stat().st_size > 0, f
    s = json.loads((out / "summary.json").read_text())
    assert set(s["arms"]) == {*ic.ARMS, "vanilla-4L"} and s["segment"] == 8 and s["verdict"] in VERDICTS
    assert s["verdict"] == summary["verdict"] == "inconclusive"  # one seed: no verdict beyond that
    assert "Fewer than 3 seeds" in s["verdict_text"]
    again = run_experiment("induction-control", RunOptions(out=out, summarize_only=True, log=lambda m: None))
    assert again["segment"] == 8 and "segment of 8 distinct tokens" in (out / "README.md").read_text()


def _summ(kv50, kv90, v2_50, v1_best=0.02, v4_50=None):
    """Synthetic published runs: per seed, the step each arm crossed 50% / 90% (None: never)."""
    def arm(s50, s90, best):
        return {"final_accuracy": best, "best_accuracy": best, "non_embedding_params": 1, "wall_seconds": 1.0,
                "steps_to": {"0.5": s50, "0.9": s90, "0.99": None}}
    per_seed = [{"seed": i, "arms": {"kvshift-1L": arm(kv50[i], kv90[i], 0.97 if kv90[i] else 0.6),
                                     "vanilla-1L": arm(None, None, v1_best),
                                     "vanilla-2L": arm(v2_50[i], None, 0.8 if v2_50[i] else 0.03)}}
                for i in range(len(kv50))]
    for i, s in enumerate(per_seed if v4_50 else []):
        s["arms"]["vanilla-4L"] = arm(v4_50[i], None, 0.8)
    arms = aggregate(per_seed)
    return {"arms": arms, "per_seed": per_seed, "seeds": len(per_seed), "train": {"steps": 4000, "batch_size": 16},
            "crossing_ratio": {t: crossing_ratios(arms, "vanilla-2L", "kvshift-1L", t) for t in ("0.5", "0.9")}}


KV50, KV90, V2 = [300, 300, 400], [400, 400, 500], [2000, 2400, 1600]


def _drop(summ, seed, arm):
    """A seed whose job has not run `arm` yet (e.g. cut after its 1-layer arms)."""
    del summ["per_seed"][seed]["arms"][arm]
    summ["arms"] = aggregate(summ["per_seed"])
    return summ


@pytest.mark.parametrize("summ,verdict,phrase", [
    (_summ(KV50, KV90, V2), "reproduced", "6.7× (median of 3 seed(s), range 4.0–8.0)"),
    (_summ(KV50, KV90, V2, v4_50=[1000, 2400, 3200]), "reproduced", "4-layer / 2-layer steps to 50%: 1.00× (median"),
    (_summ(KV50, [400, None, 500], V2), "partly reproduced", "first in 3 of 3 seeds"),
    (_summ(KV50, KV90, [2000, None, 1600]), "inconclusive", "did not reach 50% in every seed"),
    (_summ(KV50[:2], KV90[:2], V2[:2]), "inconclusive", "Fewer than 3 seeds"),
    (_drop(_summ(KV50, KV90, V2), 2, "vanilla-2L"), "inconclusive", "still to run) of: vanilla-2L"),
    (_summ(KV50, KV90, V2, v1_best=0.5), "not reproduced", "Vanilla 1-layer reached 20%"),
    (_summ(KV50, KV90, [2000, None, 1600], v1_best=0.5), "not reproduced", "Vanilla 1-layer reached 20%"),
    (_summ([3000, 3000, 400], [3500, 3500, 500], V2), "not reproduced", "0.8× (median of 3 seed(s), range 0.7–4.0)"),
    (_summ([300, None, None], [400, None, None], V2), "not reproduced", "first in 1 of 3 seeds"),
    (_summ([300, 3000, 400], [400, 3500, 500], V2), "partly reproduced", "first in 2 of 3 seeds"),
])
def test_the_verdict_rule(summ, verdict, phrase):
    v, text = ic.control_verdict(summ)
    assert v == verdict and phrase in text, text


def test_three_seeds_by_default(monkeypatch, tmp_path):
    seen = []

    def fake_run_arms(name, arms, sampler, spec, n_eval, *, opts, out, paper, extra=None):
        seen.append(opts.seed_list())
        raise RuntimeError("stop")

    monkeypatch.setattr(ic, "run_arms", fake_run_arms)
    for seeds, want in ((None, [0, 1, 2]), ([4], [4])):
        with pytest.raises(RuntimeError, match="stop"):
            ic.induction_control(RunOptions(out=tmp_path, seeds=seeds), tmp_path)
        assert seen.pop() == want
