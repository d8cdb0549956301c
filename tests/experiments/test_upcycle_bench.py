"""upcycle-benchmarks: the source model's scores first, the arms compared when they exist, clear errors."""

import json

import pytest

from kvshift.experiments.base import RunOptions
from kvshift.experiments.cli import run_experiment
from kvshift.experiments.downstream import TASKS


def scores(path, acc: dict[str, float], n=200, limit=200):
    results = {t: ({"acc": a, "acc_norm": a} | ({"perplexity": 20.0} if t == "lambada" else {})) for t, a in acc.items()}
    path.write_text(json.dumps({"results": results, "n_samples": {t: {"effective": n} for t in acc},
                                "setup": {"limit": limit}, "model": str(path)}))
    return path


SOURCE = {"lambada": 0.40, "hellaswag": 0.40, "piqa": 0.66, "winogrande": 0.51, "arc_easy": 0.55, "arc_challenge": 0.27}


def test_source_only_is_inconclusive_and_says_which_tasks_are_above_chance(tmp_path):
    src = scores(tmp_path / "source.json", SOURCE)
    out = tmp_path / "out"
    s = run_experiment("upcycle-benchmarks", RunOptions(out=out, runs=tmp_path / "runs", inputs=[f"source={src}"]))
    assert s["verdict"] == "inconclusive"
    # winogrande 0.51 and arc_challenge 0.27 are within two standard errors of chance at n = 200
    assert "above chance on 4/6 tasks" in s["verdict_text"] and "not evaluated yet" in s["verdict_text"]
    assert list(s["tasks"]) == list(TASKS)
    readme = (out / "README.md").read_text()
    assert "| piqa (acc) | 200 | 0.5 | 0.6600 ± 0.0335 |" in readme


def test_arms_are_compared_per_seed_against_the_vanilla_arm_of_that_seed(tmp_path):
    src = scores(tmp_path / "source.json", SOURCE)
    van = scores(tmp_path / "vanilla.json", {t: a + 0.01 for t, a in SOURCE.items()}, n=2000)
    kv = scores(tmp_path / "kvshift.json", {t: a + 0.08 for t, a in SOURCE.items()}, n=2000)
    # one seed: the differences are reported, the verdict waits for a second seed
    s = run_experiment("upcycle-benchmarks", RunOptions(out=tmp_path / "o", runs=tmp_path / "runs", inputs=[
        f"source={src}", f"kvshift={kv}", f"vanilla={van}"]))
    assert list(s["models"]) == ["source", "vanilla-s0", "kvshift-s0"]  # source first, whatever the order given
    assert s["verdict"] == "inconclusive" and "the rule needs 2 seeds" in s["verdict_text"]
    assert "Seed 0: kvshift − vanilla accuracy: mean +0.0700" in s["verdict_text"]
    assert all(r["kvshift-s0"]["significant"] for r in s["tasks"].values())
    assert "Δ kvshift-s0" in (tmp_path / "o" / "README.md").read_text()
    van1 = scores(tmp_path / "vanilla1.json", {t: a + 0.02 for t, a in SOURCE.items()}, n=2000)
    kv1 = scores(tmp_path / "kvshift1.json", {t: a + 0.09 for t, a in SOURCE.items()}, n=2000)
    s = run_experiment("upcycle-benchmarks", RunOptions(out=tmp_path / "o1", runs=tmp_path / "runs", inputs=[
        f"source={src}", f"kvshift-s1={kv1}", f"vanilla-s0={van}", f"kvshift-s0={kv}", f"vanilla-s1={van1}"]))
    assert list(s["models"]) == ["source", "vanilla-s0", "kvshift-s0", "vanilla-s1", "kvshift-s1"]
    assert s["seeds"] == [0, 1] and s["verdict"] == "reproduced"
    # seed 1's kvshift is compared with seed 1's vanilla, not seed 0's
    assert s["tasks"]["piqa"]["kvshift-s1"]["diff"] == pytest.approx(0.07)
    kv_worse = scores(tmp_path / "kv2.json", {t: a - 0.08 for t, a in SOURCE.items()}, n=2000)
    s = run_experiment("upcycle-benchmarks", RunOptions(out=tmp_path / "o2", runs=tmp_path / "runs", inputs=[
        f"source={src}", f"vanilla-s0={van}", f"kvshift-s0={kv}", f"vanilla-s1={van1}", f"kvshift-s1={kv_worse}"]))
    assert s["verdict"] == "not reproduced"  # better in seed 0, worse in seed 1
    same = scores(tmp_path / "kv3.json", {t: a + 0.012 for t, a in SOURCE.items()}, n=2000)
    s = run_experiment("upcycle-benchmarks", RunOptions(out=tmp_path / "o3", runs=tmp_path / "runs", inputs=[
        f"source={src}", f"vanilla-s0={van}", f"kvshift-s0={kv}", f"vanilla-s1={van1}", f"kvshift-s1={same}"]))
    assert s["verdict"] == "partly reproduced"  # better in seed 0, no difference in seed 1
    same0 = scores(tmp_path / "kv4.json", {t: a + 0.013 for t, a in SOURCE.items()}, n=2000)
    s = run_experiment("upcycle-benchmarks", RunOptions(out=tmp_path / "o4", runs=tmp_path / "runs", inputs=[
        f"source={src}", f"vanilla-s0={van}", f"kvshift-s0={same0}", f"vanilla-s1={van1}", f"kvshift-s1={same}"]))
    assert s["verdict"] == "inconclusive" and "cannot separate the arms" in s["verdict_text"]  # no seed differs


def test_bad_inputs_name_the_problem(tmp_path):
    src = scores(tmp_path / "source.json", SOURCE)
    with pytest.raises(ValueError, match="needs source=DIR"):
        run_experiment("upcycle-benchmarks", RunOptions(out=tmp_path / "o", inputs=[f"vanilla={src}"]))
    with pytest.raises(ValueError, match="NAME must be one of"):
        run_experiment("upcycle-benchmarks", RunOptions(out=tmp_path / "o", inputs=[f"src={src}"]))
    with pytest.raises(ValueError, match="NAME must be one of"):
        run_experiment("upcycle-benchmarks", RunOptions(out=tmp_path / "o", inputs=[f"source-s1={src}"]))
    with pytest.raises(ValueError, match="kvshift-s0 given twice"):
        run_experiment("upcycle-benchmarks", RunOptions(out=tmp_path / "o", inputs=[
            f"source={src}", f"kvshift={src}", f"kvshift-s0={src}"]))
    with pytest.raises(FileNotFoundError, match="--input source"):
        run_experiment("upcycle-benchmarks", RunOptions(out=tmp_path / "o", inputs=[f"source={tmp_path / 'nope'}"]))
    stale = scores(tmp_path / "s100.json", SOURCE, limit=100)  # another limit than the scale's: refused
    with pytest.raises(ValueError, match="at limit 200"):
        run_experiment("upcycle-benchmarks", RunOptions(out=tmp_path / "o", inputs=[f"source={stale}"]))
