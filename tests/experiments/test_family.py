"""KV shifting beside its family: lm-family, family-induction and family-hopk end to end at a tiny scale, and
their pure verdict and ratio functions on hand-made inputs."""

import json
import math
import shutil

import pytest

from kvshift.experiments import family_probes as fp
from kvshift.experiments import toy
from kvshift.experiments.base import VERDICTS, RunOptions
from kvshift.experiments.cli import run_experiment
from kvshift.experiments.lm import family
from kvshift.experiments.lm.spec import FAMILY_ARMS, plan, run_config, parts
from kvshift.experiments.registry import EXPERIMENTS
from kvshift.experiments.report import render
from kvshift.train.testing import write_tiny_shards

FILES = ("summary.json", "README.md", "plot.png", "metrics.jsonl")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("lm-shards"), train_docs=400)


def _check(out, name):
    s = json.loads((out / "summary.json").read_text())
    assert s["experiment"] == name and s["scale"] == "cpu" and s["verdict"] in VERDICTS
    assert s["verdict_text"] and "\n" not in s["verdict_text"]
    assert (out / "plot.png").stat().st_size > 5000
    assert s["verdict"] in (out / "README.md").read_text()
    return s


# ---- lm-family --------------------------------------------------------------------------------------
def test_lm_family_end_to_end_shares_runs_with_lm_seeds(shards, tmp_path):
    logs = []
    kw = dict(runs=tmp_path / "runs", shards=shards, steps=3, log=logs.append)
    run_experiment("lm-seeds", RunOptions(out=tmp_path / "seeds", seeds=[0], **kw))
    shutil.rmtree(tmp_path / "runs")  # a fresh machine: only the published results travel
    out = tmp_path / "family"
    logs.clear()
    run_experiment("lm-family", RunOptions(out=out, seeds=[0, 1], **kw))
    s = _check(out, "lm-family")
    for f in ("summary.json", "README.md", "plot.png"):
        assert (out / f).stat().st_size > 0
    # lm-seeds' 10m runs of seed 0 are the same runs: found among its published results, not trained again
    shared = [m for m in logs if "the same run is published in" in m]
    assert len(shared) == 2 and all(" 10m " in m and " s0:" in m and "seeds" in m for m in shared)
    for arm in ("vanilla", "kvshift"):
        a, b = (json.loads((d / "runs/10m" / f"{arm}-s0/summary.json").read_text()) for d in (tmp_path / "seeds", out))
        assert a == b
    assert sum("training 3 steps" in m for m in logs) == 2 * 2 * len(FAMILY_ARMS) - 2
    assert set(s["arms"]) == {"10m", "50m"}
    for size, table in s["arms"].items():
        assert list(table) == list(FAMILY_ARMS)
        assert table["vanilla"]["params_added"] == 0 and table["keyoffset"]["params_added"] == 0
        assert table["canon"]["params_added"] > table["dconv"]["params_added"] > 0
        assert table["canon"]["flops_added"] > 0 and table["keyoffset"]["flops_added"] == 0
        assert table["vanilla"]["tokens_per_s_ratio"] == pytest.approx(1.0)
        assert table["vanilla"]["peak_memory_ratio"] is None  # CPU runs record no CUDA memory
        for a, r in table.items():
            assert r["delta"]["n"] == 2 and r["delta"]["min"] <= r["delta"]["mean"] <= r["delta"]["max"]
        assert s["decisions"][size] is not None
    assert s["verdict"] != "inconclusive"  # 2 seeds of every arm at both sizes decide
    # the arms share the data and every hyperparameter: the run configs differ in attention and mixer only
    st = s["parts"]["10m"]
    cfgs = {a: json.loads((out / st["runs"][a]["0"]["run_dir"] / "config.json").read_text()) for a in FAMILY_ARMS}
    strip = lambda c: {**c, **{m: {k: v for k, v in c[m].items() if k not in ("attention", "mixer")}  # noqa: E731
                               for m in ("model", "model_config")}}
    assert all(strip(c) == strip(cfgs["vanilla"]) for c in cfgs.values())
    assert {(c["model"].get("attention"), c["model"].get("mixer", "none")) for c in cfgs.values()} == {
        ("vanilla", "none"), ("kvshift", "none"), ("vanilla", "dconv"), ("vanilla", "canon"),
        ("vanilla", "keyoffset"), ("vanilla", "smear"), ("kvshift", "canon")}
    # rerunning trains nothing; --summarize rebuilds the same verdict
    logs.clear()
    run_experiment("lm-family", RunOptions(out=out, seeds=[0, 1], **kw))
    assert not any("training" in m for m in logs)
    again = run_experiment("lm-family", RunOptions(out=out, summarize_only=True, log=lambda m: None))
    assert again["verdict"] == s["verdict"]
    with pytest.raises(ValueError, match="--arms: unknown arms"):
        run_experiment("lm-family", RunOptions(out=out, arms=["window2"], **kw))


def test_lm_family_10m_is_lm_seeds_config_and_jobs_fit_a_command(shards):
    fam, seeds = parts("lm-family", "gpu"), parts("lm-seeds", "gpu")
    assert fam[0].steps == seeds[0].steps and fam[0].seeds == seeds[0].seeds
    for arm in ("vanilla", "kvshift"):
        a, b = (run_config("gpu", p[0], arm, 0, shards).to_dict() for p in (fam, seeds))
        assert a == b
    assert run_config("gpu", fam[1], "kvshift_canon", 0, shards).model_config().mixer == "canon"
    jobs = [(j, sec) for j, _, sec in plan("gpu") if j.startswith("lm-family")]
    assert len(jobs) == 12 and all(sec < 9.5 * 60 for _, sec in jobs)


def test_peak_memory_is_read_only_where_the_trainer_reset_it():
    assert family.peak_memory({"peak_memory_bytes": 7, "peak_memory_scope": "launch"}) == 7
    # written before the reset: possibly an earlier run's peak in the same process
    assert family.peak_memory({"peak_memory_bytes": 7}) is None
    assert family.peak_memory({"peak_memory_bytes": None, "peak_memory_scope": None}) is None


def _fake_run(d, loss, tps, mem, device):
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text(json.dumps({"step": 10, "tokens": 100, "val_loss": loss}) + "\n")
    (d / "summary.json").write_text(json.dumps({
        "final_val_loss": loss, "diverged": False, "tokens": 100, "non_embedding_params": 10,
        "flops_per_token": 60.0, "tokens_per_s": tps, "peak_memory_bytes": mem, "peak_memory_scope": "launch",
        "device_name": device}))
    return d


def test_throughput_and_memory_ratios_compare_one_kind_of_device(tmp_path):
    runs = {"vanilla": {0: _fake_run(tmp_path / "v0", 2.0, 100.0, 50, "H200")},
            "kvshift": {0: _fake_run(tmp_path / "k0", 1.9, 95.0, 50, "H200")}}
    t = family.arm_table(runs)
    assert t["kvshift"]["tokens_per_s_ratio"] == pytest.approx(0.95) and t["kvshift"]["peak_memory_ratio"] == 1.0
    assert t["kvshift"]["delta"]["mean"] == pytest.approx(-0.1)
    # a run adopted from results measured on another GPU: no ratio across devices, the losses still compare
    runs["dconv"] = {0: _fake_run(tmp_path / "d0", 1.95, 80.0, 60, "A100")}
    t = family.arm_table(runs)
    assert all(t[a]["tokens_per_s_ratio"] is None and t[a]["peak_memory_ratio"] is None for a in t)
    assert t["dconv"]["delta"]["mean"] == pytest.approx(-0.05)


def test_tokens_to_reach_ratio():
    curve = [(100, 3.0), (200, 2.5), (300, 2.2), (400, 2.0)]
    assert family.tokens_to_reach_ratio(curve, 2.5, 400) == 0.5
    assert family.tokens_to_reach_ratio(curve, 2.3, 400) == 0.75  # the first evaluation at or below
    assert family.tokens_to_reach_ratio(curve, 1.9, 400) is None
    assert family.tokens_to_reach_ratio(curve, None, 400) is None


def _table(diverged=(), **deltas):
    """arm -> per-seed deltas; `diverged`: arms with a diverged run."""
    t = {"vanilla": [0.0, 0.0]}
    t.update(deltas)
    return {a: {"delta": {"mean": sum(d) / len(d), "n": len(d)}, "delta_per_seed": dict(enumerate(d)),
                "diverged": int(a in diverged)} for a, d in t.items()}


def test_size_decision_counts_a_rival_only_beyond_the_seed_spread():
    base = dict(dconv=[-0.01, -0.02], canon=[-0.03, -0.02], keyoffset=[0.0, 0.01], smear=[0.0, 0.0])
    d = family.size_decision(_table(kvshift=[-0.02, -0.03], **base))
    assert d["holds"] and d["beaten_by"] == [] and d["best_member"] in ("kvshift", "canon")
    # canon lower by 0.05 with spreads of 0.01: beaten
    d = family.size_decision(_table(kvshift=[-0.02, -0.03], **{**base, "canon": [-0.08, -0.07]}))
    assert not d["holds"] and d["beaten_by"] == ["canon"] and d["best_member"] == "canon"
    assert d["closest"] == "canon" and d["closest_ahead"] == pytest.approx(0.05)
    # the same means with a wide KV-shift spread (0.1): within the spread, not beaten
    d = family.size_decision(_table(kvshift=[0.025, -0.075], **{**base, "canon": [-0.08, -0.07]}))
    assert d["holds"]
    # the verdict says what the seeds could have shown: the closest member's gap and the margin it needed
    assert ("closest member canon, 0.0500 ahead of KV shift; it needed more than 0.1000"
            in family.family_verdict({"10m": d}, ["10m"])[1])
    d = family.size_decision(_table(kvshift=[-0.04, -0.05], **base))
    assert "closest member canon, 0.0200 behind KV shift" in family.family_verdict({"10m": d}, ["10m"])[1]
    # one seed of a rival: this size cannot decide
    assert family.size_decision(_table(kvshift=[-0.02, -0.03], **{**base, "smear": [0.0]})) is None
    # a divergence is a loss: KV shift diverging in a seed is beaten by the members that did not; a rival that
    # diverged does not beat it on its surviving seeds
    d = family.size_decision(_table(kvshift=[-0.02, -0.03], diverged=("kvshift",), **base))
    assert d["beaten_by"] == list(family.RIVALS)
    d = family.size_decision(_table(kvshift=[-0.02, -0.03], diverged=("canon",), **{**base, "canon": [-0.08, -0.07]}))
    assert d["holds"]


def test_family_verdict_rule():
    yes, no = {"holds": True, "beaten_by": [], "best_member": "kvshift"}, \
        {"holds": False, "beaten_by": ["canon"], "best_member": "canon"}
    sizes = ["10m", "50m"]
    assert family.family_verdict({"10m": yes, "50m": yes}, sizes)[0] == "reproduced"
    assert family.family_verdict({"10m": yes, "50m": no}, sizes)[0] == "partly reproduced"
    assert family.family_verdict({"10m": yes}, sizes)[0] == "partly reproduced"
    assert family.family_verdict({"10m": no, "50m": no}, sizes)[0] == "not reproduced"
    assert family.family_verdict({"10m": no, "50m": None}, sizes)[0] == "inconclusive"
    assert family.family_verdict({"10m": None}, sizes)[0] == "inconclusive"
    assert "beaten by canon" in family.family_verdict({"10m": no, "50m": no}, sizes)[1]


# ---- family-induction and family-hopk ----------------------------------------------------------------
TINY = dict(vocab=64, seq=24, pool=16, dim=16, heads=2, ffn=32, batch=4, steps=6, lr=1e-3, warmup=2,
            eval_every=3, n_eval=8, compile=False, bf16=False)
IDENTITY_INIT = ("vanilla", "dconv", "canon", "smear")  # mixers that start as the model without them


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(toy.INDUCTION, "cpu", dict(TINY))
    monkeypatch.setitem(fp.FAMILY_HOPK, "cpu", dict(fp.FAMILY_HOPK["cpu"], depths=(2,), seq=24, dim=16, heads=2,
                                                    ffn=32, batch=8, steps=6, warmup=2, eval_every=3, n_eval=4))


def test_family_induction_end_to_end(tiny, tmp_path):
    out = tmp_path / "ind"
    s = run_experiment("family-induction", RunOptions(out=out, runs=tmp_path / "runs", seeds=[0, 1],
                                                      log=lambda m: None))
    for f in FILES:
        assert (out / f).stat().st_size > 0, f
    s = _check(out, "family-induction")
    assert list(s["arms"]) == [f"{a}-1L" for a in fp.MEMBERS] and s["seeds"] == 2
    assert set(s["median_steps_to_90"]) == set(s["arms"])
    mixers = {a: r["model"]["mixer"] for a, r in s["per_seed"][0]["arms"].items()}
    assert mixers == {f"{a}-1L": m.get("mixer", "none") for a, m in fp.MEMBERS.items()}
    assert all(r["model"]["n_layers"] == 1 for r in s["per_seed"][0]["arms"].values())
    # same data and init: the mixers with an identity init start exactly where vanilla starts
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    start = {r["arm"]: r["target_loss"] for r in recs if r["eval"] and r["step"] == 0 and r["seed"] == 1}
    assert len({round(start[f"{a}-1L"], 5) for a in IDENTITY_INIT}) == 1


def test_family_hopk_end_to_end(tiny, tmp_path):
    out = tmp_path / "hopk"
    run_experiment("family-hopk", RunOptions(out=out, runs=tmp_path / "runs", seeds=[0, 1], log=lambda m: None))
    for f in FILES:
        assert (out / f).stat().st_size > 0, f
    s = _check(out, "family-hopk")
    assert s["depths"] == [2] and list(s["by_depth"]["2"]) == list(fp.MEMBERS) and s["seeds"] == 2
    assert s["by_depth"]["2"]["canon"]["non_embedding_params"] > s["by_depth"]["2"]["vanilla"]["non_embedding_params"]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = {r["arm"]: r["mean_error"] for r in recs if r["eval"] and r["step"] == 0 and r["seed"] == 0}
    assert set(first) == set(fp.MEMBERS)
    assert len({round(first[a], 6) for a in IDENTITY_INIT}) == 1
    again = run_experiment("family-hopk", RunOptions(out=out, summarize_only=True, log=lambda m: None))
    assert again["verdict"] == s["verdict"]
    with pytest.raises(ValueError, match="--arms: family-hopk has arms"):
        run_experiment("family-hopk", RunOptions(out=out, arms=["nope"], log=lambda m: None))


def _ind_arms(**steps):
    """arm -> per-seed steps to 90% (None: never)."""
    return {f"{a}-1L": {"seeds": list(range(len(v))), "steps_to": {"0.9": {
        "per_seed": {str(i): x for i, x in enumerate(v)}, "reached": f"{sum(x is not None for x in v)}/{len(v)}"}}}
        for a, v in steps.items()}


def test_induction_verdict_rule():
    base = dict(vanilla=[None, None], dconv=[400, 500], canon=[300, 350], keyoffset=[200, 300], smear=[None, None])
    assert fp.induction_verdict(_ind_arms(kvshift=[250, 300], **base))[0] == "reproduced"
    v, text, extra = fp.induction_verdict(_ind_arms(kvshift=[600, 700], **base))
    assert v == "partly reproduced" and extra["faster_than_kvshift"] == ["dconv", "canon", "keyoffset"]
    assert fp.induction_verdict(_ind_arms(kvshift=[250, 300, None], **base))[0] == "partly reproduced"  # a seed misses
    assert fp.induction_verdict(_ind_arms(kvshift=[250, None], **base))[0] == "not reproduced"  # upper median: never
    assert fp.induction_verdict(_ind_arms(kvshift=[None, None], **base))[0] == "not reproduced"
    assert fp.induction_verdict(_ind_arms(kvshift=[250], **base))[0] == "inconclusive"
    none = {a: [None, None] for a in base}
    assert fp.induction_verdict(_ind_arms(kvshift=[None, None], **none))[0] == "inconclusive"
    assert fp.median_steps({"0": 5, "1": None, "2": 3}) == 5 and fp.median_steps({"0": None}) == math.inf
    # the vanilla 1-layer control learned the task: the probe cannot rank the mixers
    v, text, _ = fp.induction_verdict(_ind_arms(kvshift=[250, 300], **{**base, "vanilla": [900, 800]}))
    assert v == "inconclusive" and "does not need a mixer" in text


def _hop_rows(**solved):
    return {a: {"hops_solved": h, "hops_solved_per_seed": {"0": h, "1": h}, "seeds": 2} for a, h in solved.items()}


def test_hopk_family_verdict_rule():
    base = dict(vanilla=3, dconv=5, canon=6, keyoffset=4, smear=3)
    assert fp.hopk_family_verdict(_hop_rows(kvshift=6, **base), 16)[0] == "reproduced"
    assert fp.hopk_family_verdict(_hop_rows(kvshift=5, **base), 16)[0] == "partly reproduced"
    assert fp.hopk_family_verdict(_hop_rows(kvshift=3, **base), 16)[0] == "not reproduced"
    assert fp.hopk_family_verdict(_hop_rows(**{a: 16 for a in fp.MEMBERS}), 16)[0] == "inconclusive"
    assert fp.hopk_family_verdict(_hop_rows(**{a: -1 for a in fp.MEMBERS}), 16)[0] == "inconclusive"
    one = _hop_rows(kvshift=6, **base)
    one["smear"]["seeds"] = 1
    assert fp.hopk_family_verdict(one, 16)[0] == "inconclusive"
    # the seeds disagree: a member ahead on the mean curve only does not beat KV shift outright
    split = _hop_rows(kvshift=5, **base)
    split["canon"] |= {"hops_solved": 6, "hops_solved_per_seed": {"0": 8, "1": 4}}
    split["vanilla"] |= {"hops_solved": 5, "hops_solved_per_seed": {"0": 5, "1": 5}}
    split["dconv"] = split["keyoffset"] = split["smear"] = split["vanilla"]
    v, text = fp.hopk_family_verdict(split, 16)
    assert v == "partly reproduced" and "in every seed: none" in text
    # the best arm solves fewer than 2 hops: a one-hop difference cannot rank anything
    assert fp.hopk_family_verdict(_hop_rows(vanilla=0, kvshift=0, dconv=1, canon=0, keyoffset=1, smear=0), 16)[0] \
        == "inconclusive"


def test_family_experiments_are_registered_with_report_rows(tmp_path):
    for name in ("lm-family", "family-induction", "family-hopk"):
        assert EXPERIMENTS[name].ref == "Family (beyond the paper)" and EXPERIMENTS[name].rule
    text = render(tmp_path)
    assert "**lm-family** (Family (beyond the paper))" in text and "**family-hopk**" in text
