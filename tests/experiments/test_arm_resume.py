"""A toy arm cut by a time limit (SIGTERM) or a crash resumes on the next identical command and publishes
exactly what an uninterrupted run publishes; a run directory of another arm setting is started afresh."""

import functools
import json
import os
import signal

import pytest
import torch

from kvshift.experiments import arms, toy
from kvshift.experiments import hopk as hopk_exp
from kvshift.experiments.arms import (
    ArmInterrupted,
    DataStream,
    StreamSource,
    TrainSpec,
    target_accuracy,
    train_arm,
)
from kvshift.experiments.base import RunOptions
from kvshift.experiments.cli import run_experiment
from kvshift.train.checkpoint import list_checkpoints
from kvshift.utils.io import read_json, read_jsonl

TINY = dict(vocab=64, seq=24, pool=16, dim=16, heads=2, ffn=32, batch=4, steps=12, lr=1e-3, warmup=2,
            eval_every=3, n_eval=8, compile=False, bf16=False)
TIMING = ("tokens_per_s", "wall_seconds", "wall_time_s", "train_time_s", "train_seconds", "data_generation_seconds")


class Crash(Exception):
    """Stands in for a SIGKILL: the launch dies after a step, leaving the last periodic checkpoint."""


def _cut(monkeypatch, at: int, how: str):
    """The next launch of the trainer is stopped after step `at`: SIGTERM to this process (what the time limit
    sends; the trainer checkpoints and stops) or a crash (nothing written after the step)."""
    real = arms.train

    def once(*a, **kw):
        monkeypatch.setattr(arms, "train", real)

        def hook(step, rec):
            if step == at:
                if how == "sigterm":
                    os.kill(os.getpid(), signal.SIGTERM)
                else:
                    raise Crash(step)
        return real(*a, on_step=hook, **kw)
    monkeypatch.setattr(arms, "train", once)


def _strip(x):
    """A record without its timings (the only thing a resumed run may change)."""
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in TIMING and k != "provenance"}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


@pytest.fixture(scope="module")
def task():
    s = TINY
    sampler = toy._induction_sampler(s)
    g = torch.Generator().manual_seed(arms.EVAL_SEED)
    ev = sampler(s["n_eval"], g)
    streams = {seed: DataStream(sampler, s["batch"], s["steps"], seed=seed, workers=1) for seed in (1000, 1001)}
    return streams, functools.partial(target_accuracy, *ev, torch.device("cpu"))


def _arm(task, run_dir, *, data_seed=1000, lr=1e-3, log=None):
    streams, evaluator = task
    cfg = toy._cfg(TINY, "kvshift", 1)
    spec = TrainSpec(steps=TINY["steps"], batch_size=TINY["batch"], lr=lr, warmup=2, eval_every=3, ckpt_every=4,
                     coefficients_every=3)
    return train_arm("kvshift-1L", cfg, StreamSource(streams[data_seed]), spec, seq_len=TINY["seq"], seed=0,
                     evaluator=evaluator, run_dir=run_dir, device=torch.device("cpu"), log=log or (lambda m: None))


@pytest.mark.parametrize("how,at,resumed_at", [("sigterm", 7, 7), ("crash", 10, 8)])
def test_interrupted_arm_resumes_to_the_uninterrupted_records(task, tmp_path, monkeypatch, how, at, resumed_at):
    ref = _arm(task, tmp_path / "ref")
    run = tmp_path / "run"
    _cut(monkeypatch, at, how)
    if how == "sigterm":
        before = signal.getsignal(signal.SIGTERM)
        with pytest.raises(ArmInterrupted, match=f"interrupted at step {at} of 12.*resumes it from step {at}"):
            _arm(task, run)
        assert signal.getsignal(signal.SIGTERM) is before  # the trainer gave the handler back
    else:
        with pytest.raises(Crash):
            _arm(task, run)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [f"step_{resumed_at:08d}"]
    lines = []
    again = _arm(task, run, log=lines.append)
    assert f"resuming {run} from step {resumed_at} of 12" in lines[0]
    assert again["summary"]["resumed_from"].endswith(f"step_{resumed_at:08d}")
    # every record (losses, accuracy at every evaluation, coefficients) as in the uninterrupted run, bit for bit
    assert _strip(again["records"]) == _strip(ref["records"])
    assert [r["step"] for r in again["records"] if "accuracy" in r] == [0, 3, 6, 9, 12]
    for k in ("final_loss", "final_eval", "steps", "tokens", "status"):
        assert again["summary"][k] == ref["summary"][k], k
    assert not (run / "checkpoints").exists()  # deleted after a finished arm, as before


@pytest.mark.parametrize("change", ["lr", "data"])
def test_a_run_dir_of_another_setting_starts_afresh(task, tmp_path, monkeypatch, change):
    run = tmp_path / "run"
    _cut(monkeypatch, 7, "sigterm")
    with pytest.raises(ArmInterrupted):
        _arm(task, run)
    kw = {"lr": 2e-3} if change == "lr" else {"data_seed": 1001}
    ref = _arm(task, tmp_path / "ref", **kw)
    lines = []
    r = _arm(task, run, log=lines.append, **kw)
    assert r["summary"]["resumed_from"] is None and not any("resuming" in m for m in lines)
    assert any(f"replacing {run} (another configuration, data or evaluator)" in m for m in lines), lines
    assert _strip(r["records"]) == _strip(ref["records"])
    assert (run / "command.txt").read_text().count("\n") == 1  # one launch: a new run


def test_finished_kept_run_is_trained_again(task, tmp_path, monkeypatch):
    """A finished arm whose final checkpoint was kept (keep_model) is not 'resumed' from its last step."""
    streams, evaluator = task
    spec = TrainSpec(steps=TINY["steps"], batch_size=TINY["batch"], eval_every=3, ckpt_every=4)
    kw = dict(seq_len=TINY["seq"], seed=0, evaluator=evaluator, run_dir=tmp_path / "run", device=torch.device("cpu"),
              log=lambda m: None, keep_model=True)
    first = train_arm("a", toy._cfg(TINY, "vanilla", 1), StreamSource(streams[1000]), spec, **kw)
    second = train_arm("a", toy._cfg(TINY, "vanilla", 1), StreamSource(streams[1000]), spec, **kw)
    assert second["summary"]["resumed_from"] is None and _strip(second["records"]) == _strip(first["records"])


def test_checkpoint_interval_defaults():
    assert TrainSpec(steps=2000, batch_size=1).checkpoint_interval() == 250
    assert TrainSpec(steps=400, batch_size=1).checkpoint_interval() == 50
    assert TrainSpec(steps=6, batch_size=1).checkpoint_interval() == 0  # tiny test arms: only the final one
    assert TrainSpec(steps=2000, batch_size=1, ckpt_every=0).checkpoint_interval() == 0
    assert "ckpt_every" not in TrainSpec(steps=6, batch_size=1).to_dict()  # published settings stay comparable


def test_toy_experiment_publishes_the_same_run_after_a_cut(tmp_path, monkeypatch):
    monkeypatch.setitem(toy.INDUCTION, "cpu", dict(TINY, steps=6))

    def run(out, runs):
        return run_experiment("induction-depth", RunOptions(out=out, runs=runs, arms=["kvshift-1L", "vanilla-1L"],
                                                            log=lambda m: None))
    ref = run(tmp_path / "ref", tmp_path / "ref-runs")
    _cut(monkeypatch, 4, "sigterm")
    with pytest.raises(ArmInterrupted, match="resumes it from step 4"):
        run(tmp_path / "out", tmp_path / "runs")  # kvshift-1L, the first arm, is cut: nothing published
    assert not (tmp_path / "out" / "runs").exists()
    s = run(tmp_path / "out", tmp_path / "runs")
    for arm in ("kvshift-1L", "vanilla-1L"):
        for f, read in ((f"{arm}-s0.json", read_json), (f"{arm}-s0.metrics.jsonl", read_jsonl)):
            assert _strip(read(tmp_path / "out" / "runs" / f)) == _strip(read(tmp_path / "ref" / "runs" / f)), f
    assert _strip(s["arms"]) == _strip(ref["arms"]) and s["verdict_text"] == ref["verdict_text"]


def test_hopk_publishes_the_same_run_after_a_cut(tmp_path, monkeypatch):
    """hop-k trains its arms through the same path (another evaluator and batch format): a cut arm resumes too."""
    monkeypatch.setitem(hopk_exp.HOPK["iid"], "cpu", dict(hopk_exp.HOPK["iid"]["cpu"], depths=(1,), seq=24, dim=16,
                                                          heads=2, ffn=32, batch=8, steps=8, warmup=2, eval_every=4,
                                                          n_eval=4))

    def run(out):
        return run_experiment("hopk", RunOptions(out=out, runs=out / "scratch", log=lambda m: None))
    run(tmp_path / "ref")
    _cut(monkeypatch, 5, "sigterm")
    with pytest.raises(ArmInterrupted, match="resumes it from step 5"):
        run(tmp_path / "out")
    run(tmp_path / "out")
    for f in ("vanilla-s0.json", "kvshift-s0.json", "vanilla-s0.metrics.jsonl", "kvshift-s0.metrics.jsonl"):
        read = read_jsonl if f.endswith(".jsonl") else read_json
        assert _strip(read(tmp_path / "out" / "runs" / "L1" / f)) == _strip(read(tmp_path / "ref" / "runs" / "L1" / f))
