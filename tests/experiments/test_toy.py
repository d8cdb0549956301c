"""The toy experiments end to end at a tiny scale: every output file, sane summaries, and the report."""

import json

import pytest
import torch

from kvshift.experiments import toy, toy_runs
from kvshift.experiments.arms import DataStream
from kvshift.experiments.base import VERDICTS, RunOptions
from kvshift.experiments.cli import run_experiment
from kvshift.experiments.registry import EXPERIMENTS, get
from kvshift.experiments.report import render, write_report

TINY = dict(vocab=64, seq=24, pool=16, dim=16, heads=2, ffn=32, batch=4, steps=6, lr=1e-3, warmup=2,
            eval_every=3, n_eval=8, compile=False, bf16=False)
FILES = ("metrics.jsonl", "summary.json", "plot.png", "README.md")


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(toy.INDUCTION, "cpu", dict(TINY))
    monkeypatch.setitem(toy.WIDTH, "cpu", dict(dim=8, heads=1, ffn=16, init_std=8 ** -0.5, batch=4, steps=6, lr=1e-3,
                                              warmup=2, eval_every=3, compile=False))
    monkeypatch.setitem(toy.NGRAM_SIZES, "cpu", [("tiny-1L", 1, 8, 2, 16)])


@pytest.mark.parametrize("name", ["induction-depth", "induction-width", "ngram", "shift-dynamics"])
def test_toy_experiment_writes_every_file(tiny, tmp_path, name):
    out = tmp_path / name
    summary = run_experiment(name, RunOptions(out=out, runs=tmp_path / "runs", log=lambda m: None))
    for f in FILES:
        assert (out / f).stat().st_size > 0, f
    s = json.loads((out / "summary.json").read_text())
    assert s["experiment"] == name and s["verdict"] in VERDICTS
    assert s["train"]["steps"] == TINY["steps"] and s["torch"] == torch.__version__
    for arm in s["arms"].values():
        assert 0.0 <= arm["final_accuracy"] <= 1.0
        assert set(arm["steps_to"]) == {"0.5", "0.9", "0.99"}
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    arms = {r["arm"] for r in recs}
    assert arms == set(s["arms"])
    # every arm saw the same number of steps and was evaluated at the same steps
    evals = {a: [r["step"] for r in recs if r["arm"] == a and r.get("eval")] for a in arms}
    assert len({tuple(v) for v in evals.values()}) == 1 and evals[next(iter(arms))] == [0, 3, 6]
    # every arm trained through the trainer: its run directory holds the trainer's files, no checkpoint
    for a in arms:
        rd = tmp_path / "runs" / f"{name}-cpu" / f"{a}-s0"
        assert json.loads((rd / "summary.json").read_text())["status"] == "finished"
        assert not (rd / "checkpoints").exists()
    if name == "shift-dynamics":
        assert any("coefficients" in r for r in recs)
        assert len(s["heads"]) == TINY["heads"]
    assert summary["verdict"] == s["verdict"]


def test_jobs_split_by_seed_and_arm_merge_into_one_summary(tiny, tmp_path):
    out, quiet = tmp_path / "depth", lambda m: None
    run_experiment("induction-depth", RunOptions(out=out, runs=tmp_path / "runs", seeds=[0], log=quiet))
    run_experiment("induction-depth", RunOptions(out=out, runs=tmp_path / "runs", seeds=[1],
                                                 arms=["kvshift-1L", "vanilla-2L"], log=quiet))
    s = json.loads((out / "summary.json").read_text())
    assert s["seeds"] == 2 and s["arms"]["kvshift-1L"]["seeds"] == [0, 1] and s["arms"]["vanilla-1L"]["seeds"] == [0]
    assert s["arms"]["vanilla-2L"]["steps_to"]["0.5"]["per_seed"].keys() == {"0", "1"}
    assert {(r["arm"], r["seed"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())} == {
        ("kvshift-1L", 0), ("vanilla-1L", 0), ("vanilla-2L", 0), ("vanilla-2L-learned", 0),
        ("kvshift-1L", 1), ("vanilla-2L", 1)}
    again = run_experiment("induction-depth", RunOptions(out=out, summarize_only=True, log=quiet))
    assert again["arms"] == s["arms"]
    # a run of another setting in the same directory is refused by name, not averaged in
    with pytest.raises(ValueError, match="vanilla-1L-s1 was trained with"):
        run_experiment("induction-depth", RunOptions(out=out, runs=tmp_path / "runs", seeds=[1], steps=3,
                                                     arms=["vanilla-1L"], log=quiet))
    with pytest.raises(ValueError, match="--arms: induction-depth has arms"):
        run_experiment("induction-depth", RunOptions(out=out, arms=["nope"], log=quiet))


def test_median_crossing_counts_a_seed_that_never_crossed():
    def seed(i, step):
        return {"seed": i, "arms": {"a": {"steps_to": {"0.5": step, "0.9": None, "0.99": None}, "final_accuracy": 0.5,
                                          "best_accuracy": 0.5, "non_embedding_params": 1, "wall_seconds": 1.0}}}
    one = toy_runs.aggregate([seed(0, 100), seed(1, None), seed(2, None)])["a"]["steps_to"]["0.5"]
    assert one["median_step"] is None and one["reached"] == "1/3"  # one seed of three crossed: the median never
    two = toy_runs.aggregate([seed(0, 100), seed(1, 300), seed(2, None)])["a"]["steps_to"]["0.5"]
    assert two["median_step"] == 300


def test_crossing_ratios_per_seed():
    def arm(**steps):
        return {"steps_to": {"0.5": {"per_seed": steps}}}
    arms = {"v": arm(**{"0": 900, "1": None, "2": 600}), "k": arm(**{"0": 300, "1": 200, "2": 300})}
    r = toy_runs.crossing_ratios(arms, "v", "k", "0.5")
    assert r["per_seed"] == {"0": 3.0, "2": 2.0} and r["n"] == 2 and (r["min"], r["max"]) == (2.0, 3.0)
    assert toy_runs.crossing_ratios({"v": arm(**{"0": None}), "k": arm(**{"0": 300})}, "v", "k", "0.5") is None


def test_arms_share_the_data_stream(tiny):
    sampler = toy._induction_sampler(toy.INDUCTION["cpu"])
    a = DataStream(sampler, 4, 5, seed=3, workers=1)
    b = DataStream(sampler, 4, 5, seed=3, workers=2)
    c = DataStream(sampler, 4, 5, seed=4, workers=1)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.tokens, c.tokens)


def test_landscape_and_theorem2_and_report(tmp_path):
    res = tmp_path / "results"
    for name in ("landscape", "theorem2"):
        out = res / f"{name}-cpu"
        s = run_experiment(name, RunOptions(out=out, steps=50))
        assert (out / "summary.json").exists() and (out / "README.md").exists()
        assert s["verdict"] == "reproduced", s["verdict_text"]
    assert (res / "landscape-cpu" / "plot.png").stat().st_size > 10_000
    path = write_report(res, tmp_path / "REPRODUCTION.md")
    text = path.read_text()
    assert "| Fig. 2 |" in text and "**reproduced**" in text and "not run yet" in text
    assert "landscape-cpu" in text


def test_registry_and_unknown_name():
    assert {"induction-depth", "induction-width", "ngram", "shift-dynamics", "landscape", "theorem2"} <= set(EXPERIMENTS)
    with pytest.raises(ValueError, match="unknown experiment"):
        get("nope")
    for e in EXPERIMENTS.values():  # every claim has its rule in words
        assert (e.claim is None) == (e.rule is None), e.name


def test_report_rows_from_bench_targets(tmp_path):
    """The cost row's targets are recomputed from the measured sections: the superseded block part counts
    for nothing, whatever targets an old file stored."""
    def write(name, sections):
        (tmp_path / "bench").mkdir(exist_ok=True)
        (tmp_path / "bench" / f"{name}.json").write_text(json.dumps({"meta": {"device": name.upper()}, **sections}))

    write("gpu-a", {"e2e": {"models": {"x": {"arms": {}, "ratios": {"tokens_per_s": {"fused": 1.0},
                                                                     "peak_mem": {"fused": 1.07}}}}}})
    write("gpu-b", {"attn": {"shapes": {"y": {"arms": {}, "ratios": {"b2b": {"fused": 1.2}}}}},
                    "block": {"shapes": {"z": {"arms": {}, "ratios": {"fused": 0.6}}}},
                    "targets": {"block/z/time_ratio": {"measured": 0.6, "op": "<=", "target": 1.03, "met": True}}})
    rows = [line for line in render(tmp_path).splitlines() if line.startswith("| Sec. 2 (cost)")]
    assert len(rows) == 2
    assert "**partly reproduced**" in rows[0] and "GPU-A" in rows[0] and "peak_mem_ratio: 1.0700 (<= 1.0, missed)" in rows[0]
    assert "Not yet measured: attn, generate" in rows[0]
    assert "**not reproduced**" in rows[1] and "(../results/bench/gpu-b.md)" in rows[1]
    assert "attn/y/time_ratio: 1.2000 (<= 1.03, missed)" in rows[1] and "block/z" not in rows[1]
    assert "Superseded, not counted: block" in rows[1]


def test_cost_row_counts_a_target_without_data_as_not_measured(tmp_path):
    """A generate case where only one arm of a ratio ran has that target without data: listed as such, never
    as missed, and the verdict rests on the measured targets."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "gpu-c.json").write_text(json.dumps({
        "meta": {"device": "GPU-C"},
        "e2e": {"models": {"x": {"arms": {}, "ratios": {"tokens_per_s": {"fused": 1.0}, "peak_mem": {"fused": 0.99}}}}},
        "generate": {"cases": {"b1-p8192": {"arms": {"lm-vanilla-compiled": {}, "lm-kvshift-compiled": {}},
                                            "ratios": {"lm-compiled": 1.01}}}}}))
    row = next(line for line in render(tmp_path).splitlines() if line.startswith("| Sec. 2 (cost)"))
    assert "Targets missed: 0 of" in row and "**reproduced**" in row
    assert "Targets without data (an arm not run in that case): generate/b1-p8192/lm-compiled-vs-llama_ratio" in row
    assert "lm-compiled-vs-llama_ratio: n/a" not in row


def test_cost_row_does_not_judge_a_ratio_of_two_runs_arms(tmp_path):
    """A merged generate case whose ratio pairs arms of different runs: named as not judged, not counted."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "gpu-d.json").write_text(json.dumps({
        "meta": {"device": "GPU-D"},
        "e2e": {"models": {"x": {"arms": {}, "ratios": {"tokens_per_s": {"fused": 1.0}, "peak_mem": {"fused": 0.99}}}}},
        "generate": {"cases": {"b1-p8": {"arms": {"lm-vanilla": {}, "lm-kvshift": {}}, "ratios": {"lm": 1.5},
                                         "cross_run_ratios": ["lm"]}}}}))
    row = next(line for line in render(tmp_path).splitlines() if line.startswith("| Sec. 2 (cost)"))
    assert "Targets missed: 0 of 2" in row and "**reproduced**" in row and "lm_ratio: 1.5" not in row
    assert "Not judged, arms of two runs (merged): generate/b1-p8/lm_ratio." in row


def _arm(final, best=None, s50=None, s90=None):
    return {"final_accuracy": final, "best_accuracy": best if best is not None else final,
            "steps_to": {"0.5": {"median_step": s50}, "0.9": {"median_step": s90}, "0.99": {"median_step": None}}}


def test_depth_verdict_is_inconclusive_while_vanilla_2l_never_learns():
    summ = {"train": {"steps": 1500, "batch_size": 64},
            "arms": {"kvshift-1L": _arm(0.98, s50=200, s90=300), "vanilla-1L": _arm(0.01), "vanilla-2L": _arm(0.02)}}
    v, text = toy.depth_verdict(summ)
    assert v == "inconclusive" and "96,000 sequences" in text
    summ["arms"]["vanilla-2L"] = _arm(0.97, s50=900, s90=1200)
    assert toy.depth_verdict(summ)[0] == "reproduced"
    summ["arms"]["vanilla-2L"] = _arm(0.97, s50=100, s90=200)  # vanilla 2L faster: only part of the claim
    assert toy.depth_verdict(summ)[0] == "partly reproduced"
    summ["arms"]["kvshift-1L"] = _arm(0.3)
    assert toy.depth_verdict(summ)[0] == "not reproduced"
    del summ["arms"]["vanilla-2L"]  # a split job has published only some arms: no verdict on the claim yet
    v, text = toy.depth_verdict(summ)
    assert v == "inconclusive" and text.endswith("Still to run: vanilla-2L.")


def _seeded(final, per50, per90):
    a = _arm(final, s50=None if None in per50.values() else max(per50.values()),
             s90=None if None in per90.values() else max(per90.values()))
    a["steps_to"]["0.5"]["per_seed"], a["steps_to"]["0.9"]["per_seed"] = per50, per90
    return a


def test_depth_verdict_bounds_the_speed_up_when_vanilla_2l_never_learns():
    """Seeds where vanilla 2L stays below 50% throughout while KV 1L passes 90% early: still inconclusive (no
    ratio to report), with the budget and a lower bound on the speed-up; too few seeds, a late KV crossing or
    one vanilla seed that learned: no bound."""
    never = {"0": None, "1": None, "2": None}
    summ = {"train": {"steps": 2000, "batch_size": 256},
            "arms": {"kvshift-1L": _seeded(0.988, {"0": 250, "1": 150, "2": 200}, {"0": 350, "1": 200, "2": 200}),
                     "vanilla-1L": _arm(0.009), "vanilla-2L": _seeded(0.008, never, never)}}
    v, text = toy.depth_verdict(summ)
    assert v == "inconclusive", text
    assert "at least 5.7× faster" in text and "each of its 3 seeds" in text and "512,000 sequences" in text
    late = _seeded(0.95, {"0": 400, "1": 450}, {"0": 600, "1": 600})
    for arms in ({"kvshift-1L": late}, {"vanilla-2L": _seeded(0.008, {"0": None}, {"0": None})},
                 {"vanilla-2L": _seeded(0.4, {"0": None, "1": 1900, "2": None}, never)}):
        v, text = toy.depth_verdict({**summ, "arms": {**summ["arms"], **arms}})
        assert v == "inconclusive" and "at least" not in text and "cannot say how much faster" in text, text


def test_width_verdict_needs_a_setup_that_learns():
    summ = {"arms": {"kvshift-1L": _arm(0.012), "vanilla-2L": _arm(0.004)}}
    assert toy.width_verdict(summ)[0] == "inconclusive"
    summ["arms"]["kvshift-1L"] = _arm(0.7)
    assert toy.width_verdict(summ)[0] == "reproduced"


def test_width_verdict_of_one_published_arm_names_the_arm_still_to_run():
    v, text = toy.width_verdict({"arms": {"kvshift-1L": _arm(0.3)}})  # an --arms job that finished first
    assert v == "inconclusive" and "Still to run: vanilla-2L" in text, text


def test_an_option_the_experiment_does_not_read_is_refused(tmp_path):
    with pytest.raises(ValueError, match="induction-depth does not use --only, --shards"):
        run_experiment("induction-depth", RunOptions(out=tmp_path, only=["10m"], shards=tmp_path))
    with pytest.raises(ValueError, match="runs at scale gpu"):
        run_experiment("bench", RunOptions(out=tmp_path))
