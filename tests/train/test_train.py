import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from kvshift.train.checkpoint import list_checkpoints
from kvshift.train.config import load_config
from kvshift.train.metrics import read_metrics
from kvshift.train.testing import losses
from kvshift.train.trainer import EXIT_DIVERGED, EXIT_INTERRUPTED, train


def _quiet(*_):
    pass


def test_end_to_end_synthetic_then_resume(tmp_path):
    out = tmp_path / "run"
    s = train(load_config("debug"), out, log=_quiet)  # 30 steps, eval every 10, ckpt every 10, keep 2
    assert s["status"] == "finished" and s["exit_code"] == 0 and s["steps"] == 30 and not s["diverged"]
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 31))
    for k in ("tokens", "loss", "lr", "grad_norm", "tokens_per_s"):
        assert all(k in r for r in recs), k
    vals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in vals] == [10, 20, 30]
    assert "val_loss/pattern" in vals[-1] and "shift" in vals[-1]
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-5:]) / 5
    assert last < first - 0.3  # it learns
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] + 0.05
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000020", "step_00000030"]
    for k in ("config", "final_val_loss", "best_val_loss", "tokens", "epochs", "wall_time_s", "tokens_per_s",
              "mfu", "device_name", "torch", "git_commit", "diverged", "diverged_step"):
        assert k in s, k
    assert s["peak_memory_bytes"] is None and s["peak_memory_scope"] is None  # CPU: no CUDA peak to record
    assert json.loads((out / "summary.json").read_text())["final_val_loss"] == s["final_val_loss"]
    assert recs[0]["lr"] == pytest.approx(3e-3 / 5)  # linear warm-up over 5 steps, then constant
    assert recs[-1]["lr"] == 3e-3
    # resume and extend
    s2 = train(load_config("debug", ["train.steps=40"]), out, resume=True, log=_quiet)
    assert s2["resumed_from"].endswith("step_00000030") and s2["steps"] == 40
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 41))


def test_end_to_end_real_loader(tmp_path, shards):
    out = tmp_path / "run"
    s = train(load_config("debug", [f"data.shard_dir={shards}", "data.kind=shards", "train.steps=12",
                                    "train.eval_every=6", "data.grad_accum=2"]), out, log=_quiet)
    assert s["status"] == "finished" and s["epochs"] > 0
    ev = s["final_eval"]
    assert ev["val_bpb"] == pytest.approx(ev["val_loss"] / 0.6931471805599453 / 3.5, rel=1e-3)
    assert {"val_loss/prose", "val_loss/code", "val_bpb/prose"} <= set(ev)
    assert s["tokens"] == 12 * 4 * 32 * 2


def test_resume_is_bit_exact(tmp_path):
    """An interrupted (SIGTERM) and resumed run reproduces the uninterrupted one bit for bit:
    losses, grad norms and final weights."""
    sets = ["train.steps=20", "train.ckpt_every=5", "train.eval_every=5", "optim.schedule=cosine",
            "optim.min_lr=1e-4", "data.grad_accum=2"]
    ref = tmp_path / "ref"
    train(load_config("debug", sets), ref, log=_quiet)

    def interrupt(step, rec):
        if step == 13:
            os.kill(os.getpid(), signal.SIGTERM)

    run = tmp_path / "run"
    s = train(load_config("debug", sets), run, on_step=interrupt, log=_quiet)
    assert s["status"] == "interrupted" and s["exit_code"] == EXIT_INTERRUPTED and s["steps"] == 13
    assert list_checkpoints(run / "checkpoints")[-1].name == "step_00000013"
    s = train(load_config("debug", sets), run, resume=True, log=_quiet)
    assert s["status"] == "finished" and s["resumed_from"].endswith("step_00000013")
    a, b = read_metrics(ref / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    assert [r.get("val_loss") for r in a] == [r.get("val_loss") for r in b]
    wa = load_file(ref / "checkpoints/step_00000020/model.safetensors")
    wb = load_file(run / "checkpoints/step_00000020/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_divergence_lr(tmp_path):
    out = tmp_path / "run"
    s = train(load_config("debug", ["optim.lr=10", "optim.warmup=0", "train.diverge_after=2",
                                    "train.ckpt_every=1", "train.steps=40"]), out, log=_quiet)
    assert s["status"] == "diverged" and s["diverged"] and s["exit_code"] == EXIT_DIVERGED
    k = s["diverged_step"]
    assert 2 < k < 40 and s["steps"] == k - 1
    ckpts = list_checkpoints(out / "checkpoints")
    assert ckpts[-1].name == f"step_{k - 1:08d}"  # the last good state, nothing after it
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"] is True and summary["diverged_step"] == k
    assert read_metrics(out / "metrics.jsonl")[-1]["diverged"] is True


def test_divergence_nan_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_ce = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def ce(*a, **k):  # the 7th training loss is NaN
        loss = real_ce(*a, **k)
        if k.get("reduction", "mean") == "mean":
            calls["n"] += 1
            if calls["n"] == 7:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", ce)
    s = train(load_config("debug", ["train.ckpt_every=5", "train.steps=20"]), out, log=_quiet)
    assert s["status"] == "diverged" and s["diverged_step"] == 7
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000005"]


def test_cli_train_and_plot(tmp_path):
    from kvshift.cli import main

    out = tmp_path / "run"
    assert main(["train", "debug", "--out", str(out), "--set", "train.steps=4", "--set", "train.eval_every=2"]) == 0
    assert len(losses(out)) == 4 and (out / "config.json").is_file() and (out / "command.txt").is_file()
    png = tmp_path / "loss.png"
    assert main(["plot", str(out), "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert main(["train", "debug", "--out", str(out), "--set", "train.stepz=4"]) == 2  # one line, exit 2


def test_rerun_guards(tmp_path):
    out = tmp_path / "run"
    cfg = load_config("debug", ["train.steps=6", "train.eval_every=3"])
    s = train(cfg, out, log=_quiet)
    with pytest.raises(ValueError, match="--resume"):  # a fresh run must not mix with old checkpoints
        train(cfg, out, log=_quiet)
    again = train(cfg, out, resume=True, log=_quiet)  # resuming a finished run changes nothing
    assert again["status"] == "finished" and again["steps"] == 6
    for k in ("final_loss", "final_val_loss", "best_val_loss", "final_val_bpb"):
        assert again[k] == s[k], k
    assert losses(out) == [r["loss"] for r in read_metrics(out / "metrics.jsonl")] and len(losses(out)) == 6


def test_checkpoint_stands_alone(tmp_path):
    from kvshift.models import LM, ModelConfig
    from kvshift.train.checkpoint import load_checkpoint

    out = tmp_path / "run"
    train(load_config("debug", ["train.steps=3", "model.attention=vanilla"]), out, log=_quiet)
    ck = list_checkpoints(out / "checkpoints")[-1]
    mc = ModelConfig.from_dict(json.loads((ck / "config.json").read_text())["model_config"])
    assert mc.attention == "vanilla"
    w, st = load_checkpoint(ck)
    m = LM(mc, seed=None)
    m.load_state_dict(w)  # keys are those of a plain LM (no DDP/FSDP/compile prefixes)
    assert st["step"] == 3 and set(st["optimizer"]["state"]) <= {n for n, _ in m.named_parameters()}
