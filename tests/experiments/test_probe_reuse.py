"""The family probes reuse the paper experiments' runs of the same setting: family-induction copies
induction-depth's vanilla-1L and kvshift-1L, family-hopk copies hopk-norepeat's vanilla and kvshift at a shared
depth — only when the task, data stream, evaluation set, model, training setting and kind of device all match."""

import dataclasses
import json

import pytest
from kvshift.experiments import family_probes as fp
from kvshift.experiments import hopk, toy, toy_runs
from kvshift.experiments.base import RunOptions
from kvshift.experiments.cli import run_experiment

TINY = dict(vocab=64, seq=24, pool=16, dim=16, heads=2, ffn=32, batch=4, steps=6, lr=1e-3, warmup=2,
            eval_every=3, n_eval=8, compile=False, bf16=False)
TINY_HOPK = dict(seq=24, dim=16, heads=2, ffn=32, batch=8, steps=6, warmup=2, eval_every=3, n_eval=4)


def _opts(out, tmp_path, logs, **kw):
    return RunOptions(out=out, runs=tmp_path / "scratch", seeds=[0], log=logs.append, **kw)


class _Captured(Exception):
    pass


def _capture_run_arms(monkeypatch, fn, scale):
    """What `fn` (an experiment) hands to toy.run_arms at `scale`: (arms by name, sampler, spec, n_eval)."""
    got = {}

    def fake(name, arms, sampler, spec, n_eval, **kw):
        got.update(arms={a.name: a.config for a in arms}, sampler=sampler, spec=spec, n_eval=n_eval)
        raise _Captured

    monkeypatch.setattr(toy, "run_arms", fake)
    with pytest.raises(_Captured):
        fn(RunOptions(scale=scale, seeds=[0], log=lambda m: None), None)
    return got


def _induction_source(monkeypatch, tmp_path, arms=("vanilla-1L", "kvshift-1L"), **task):
    """Tiny induction setting; induction-depth's runs of `arms` (family-induction's models and cpu spec, the
    task's parameters overridden by `task`) published in tmp_path/induction-depth-cpu. -> (setting, spec, arms)"""
    monkeypatch.setitem(toy.INDUCTION, "cpu", dict(TINY))
    s = toy.INDUCTION["cpu"]
    spec = toy._spec(s, None, threads=1)  # family-induction's cpu spec
    chosen = [a for a in fp.induction_arms("cpu") if a.name in arms]
    src = tmp_path / "induction-depth-cpu"
    toy.run_arms("induction-depth", chosen, toy._induction_sampler({**s, **task}), spec, s["n_eval"],
                 opts=_opts(src, tmp_path, []), out=src, paper="p")
    return s, spec, chosen


def _copied(logs, source):
    copied = [m for m in logs if "copied, not trained" in m]
    assert all(source in m for m in copied), logs
    return len(copied)


def test_gpu_settings_are_shared(monkeypatch):
    """What makes the copies valid at the scale they are used: the sampler, its parameters, the training spec,
    the evaluation size and the arm models that induction_depth and family_induction actually train with."""
    for scale in ("gpu", "cpu"):
        theirs = _capture_run_arms(monkeypatch, toy.induction_depth, scale)
        ours = _capture_run_arms(monkeypatch, fp.family_induction, scale)
        for arm in ("vanilla-1L", "kvshift-1L"):
            assert ours["arms"][arm] == theirs["arms"][arm]
        assert ours["sampler"].func is theirs["sampler"].func and ours["sampler"].args == theirs["sampler"].args
        assert ours["n_eval"] == theirs["n_eval"]
        # gpu: the same spec, so the copies happen; cpu: family-induction trains on one thread (its arms share
        # 2 cores with nothing else), so its cpu runs never match induction-depth's and nothing is copied there
        assert (ours["spec"] == theirs["spec"]) == (scale == "gpu")
    assert fp.IND_SOURCES == ("induction-depth",) and fp.HOPK_SOURCES == ("hopk-norepeat",)
    for scale in ("gpu", "cpu"):
        mine = {k: v for k, v in fp.FAMILY_HOPK[scale].items() if k != "depths"}
        assert mine == {k: v for k, v in hopk.HOPK["norepeat"][scale].items() if k != "depths"}
    assert set(fp.FAMILY_HOPK["gpu"]["depths"]) <= set(hopk.HOPK["norepeat"]["gpu"]["depths"])


def test_family_induction_copies_induction_depth_runs(monkeypatch, tmp_path):
    _induction_source(monkeypatch, tmp_path)
    src = tmp_path / "induction-depth-cpu"
    logs = []
    out = tmp_path / "family-induction-cpu"
    summ = run_experiment("family-induction", _opts(out, tmp_path, logs))
    assert _copied(logs, "induction-depth-cpu") == 2
    for arm in ("vanilla-1L", "kvshift-1L"):
        rec = json.loads((out / "runs" / f"{arm}-s0.json").read_text())
        orig = json.loads((src / "runs" / f"{arm}-s0.json").read_text())
        assert rec["adopted_from"] == f"induction-depth-cpu/runs/{arm}-s0.json"
        assert rec["result"] == orig["result"] and rec["order"] == [a.name for a in fp.induction_arms("cpu")].index(arm)
        assert rec["eval_fingerprint"] == orig["eval_fingerprint"] and len(rec["eval_fingerprint"]) == 16
        assert (out / "runs" / f"{arm}-s0.metrics.jsonl").read_text() == \
            (src / "runs" / f"{arm}-s0.metrics.jsonl").read_text()
    assert list(summ["arms"]) == [f"{a}-1L" for a in fp.MEMBERS]  # the copies summarised with the trained arms
    # a second seed has nothing to copy: every arm trains
    logs.clear()
    run_experiment("family-induction", RunOptions(out=out, runs=tmp_path / "scratch", seeds=[1], log=logs.append))
    assert not any("copied" in m for m in logs)


def test_another_task_is_not_copied(monkeypatch, tmp_path):
    """A source run of the same model and training spec on another task (here: each row drawing from a pool of
    8 ids instead of 16) has another evaluation set, so another fingerprint: trained, not copied."""
    s, spec, both = _induction_source(monkeypatch, tmp_path, pool=8)
    logs = []
    toy.run_arms("family-induction", both, toy._induction_sampler(s), spec, s["n_eval"],
                 opts=_opts(tmp_path / "family-induction-cpu", tmp_path, logs), out=tmp_path / "family-induction-cpu",
                 paper="p", sources=fp.IND_SOURCES)
    assert not any("copied" in m for m in logs)


def test_find_run_refuses_any_difference(tmp_path):
    rec = {"train": {"steps": 6, "betas": [0.9, 0.95]}, "model": {"dim": 16, "n_layers": 1, "vocab_size": 64},
           "n_eval_sequences": 8, "provenance": {"device": "NVIDIA H200"}}
    d = tmp_path / "x-gpu" / "runs"
    d.mkdir(parents=True)
    (d / "kvshift-1L-s0.json").write_text(json.dumps(rec))
    (d / "kvshift-1L-s0.metrics.jsonl").write_text("")
    base = {"train": {"steps": 6, "betas": (0.9, 0.95)}, "model": dict(rec["model"]), "n_eval_sequences": 8,
            "device": "NVIDIA H200"}
    assert toy_runs.find_run([d], "kvshift-1L-s0", base)[0] == d / "kvshift-1L-s0.json"
    assert toy_runs.find_run([d], "kvshift-1L-s1", base) is None
    for k, v in (("device", "NVIDIA H100"), ("n_eval_sequences", 16), ("train", {"steps": 7, "betas": (0.9, 0.95)}),
                 ("model", {**rec["model"], "dim": 32})):
        assert toy_runs.find_run([d], "kvshift-1L-s0", {**base, k: v}) is None, k
    # the evaluation set's fingerprint (the task's generator and parameters): a different one never matches; a
    # record from before fingerprints has none and matches on the rest
    fp_base = {**base, "eval_fingerprint": "abc"}
    assert toy_runs.find_run([d], "kvshift-1L-s0", fp_base) is not None
    (d / "kvshift-1L-s0.json").write_text(json.dumps({**rec, "eval_fingerprint": "abd"}))
    assert toy_runs.find_run([d], "kvshift-1L-s0", fp_base) is None
    (d / "kvshift-1L-s0.json").write_text(json.dumps({**rec, "eval_fingerprint": "abc"}))
    assert toy_runs.find_run([d], "kvshift-1L-s0", fp_base) is not None
    # a record without its metrics beside it is not a run to copy
    (d / "kvshift-1L-s0.metrics.jsonl").unlink()
    assert toy_runs.find_run([d], "kvshift-1L-s0", base) is None
    (d / "kvshift-1L-s0.metrics.jsonl").write_text("")
    # an option added to ModelConfig since a record was written counts at its default
    full = toy_runs._model({"dim": 16, "n_layers": 1, "vocab_size": 64})
    assert full["mixer"] == "none"
    assert toy_runs.find_run([d], "kvshift-1L-s0", {**base, "model": full}) is not None
    assert toy_runs.find_run([d], "kvshift-1L-s0", {**base, "model": {**full, "mixer": "dconv"}}) is None


def test_family_hopk_copies_hopk_norepeat_runs(monkeypatch, tmp_path):
    tiny = dict(hopk.HOPK["norepeat"]["cpu"], depths=(2,), **TINY_HOPK)
    monkeypatch.setitem(hopk.HOPK["norepeat"], "cpu", tiny)
    monkeypatch.setitem(fp.FAMILY_HOPK, "cpu", dict(tiny))
    src = tmp_path / "hopk-norepeat-cpu"
    run_experiment("hopk-norepeat", _opts(src, tmp_path, []))
    logs = []
    out = tmp_path / "family-hopk-cpu"
    summ = run_experiment("family-hopk", _opts(out, tmp_path, logs))
    assert _copied(logs, "hopk-norepeat-cpu") == 2
    for arm in ("vanilla", "kvshift"):
        rec = json.loads((out / "runs" / "L2" / f"{arm}-s0.json").read_text())
        orig = json.loads((src / "runs" / "L2" / f"{arm}-s0.json").read_text())
        assert rec["adopted_from"] == f"hopk-norepeat-cpu/runs/L2/{arm}-s0.json" and rec["final"] == orig["final"]
    assert list(summ["by_depth"]["2"]) == list(fp.MEMBERS)
    # another kind of device: not the same run
    other = dataclasses.replace(_opts(tmp_path / "family-hopk-cpu", tmp_path, logs), seeds=[0])
    for f in (src / "runs" / "L2").glob("*-s0.json"):
        rec = json.loads(f.read_text())
        rec["provenance"]["device"] = "NVIDIA H200"
        f.write_text(json.dumps(rec))
    for f in (tmp_path / "family-hopk-cpu" / "runs" / "L2").glob("*"):
        f.unlink()
    logs.clear()
    run_experiment("family-hopk", other)
    assert not any("copied" in m for m in logs)


def test_a_run_whose_model_is_kept_is_trained(monkeypatch, tmp_path):
    """--keep-checkpoints needs the trained model of the first seed: that run is never a copy."""
    s, spec, both = _induction_source(monkeypatch, tmp_path, arms=("vanilla-1L",))
    logs = []
    out = tmp_path / "family-induction-cpu"
    toy.run_arms("family-induction", both, toy._induction_sampler(s), spec, s["n_eval"],
                 opts=_opts(out, tmp_path, logs, keep_checkpoints=True), out=out, paper="p",
                 sources=fp.IND_SOURCES)
    assert not any("copied" in m for m in logs)
