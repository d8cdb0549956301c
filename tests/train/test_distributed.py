"""2 processes on CPU with gloo (what torchrun sets up, on 127.0.0.1 with a free port): DDP and FSDP2
give the single-process losses for the same global batch, and their checkpoints load in one process.

Tolerance: gradients are averaged across ranks (two half-batch means, then / 2) instead of one mean
over the full batch, so fp32 rounding differs; over 8 steps the losses agree to ~1e-6 here. We allow
2e-5 absolute."""

import json

import pytest

from kvshift.train.metrics import read_metrics
from kvshift.train.testing import dist_worker, free_port, losses, train_worker

COMMON = ["data.kind=shards", "train.eval_every=4", "train.ckpt_every=4", "data.seq_len=32"]
TOL = 2e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards, forkctx):
    """Single process, batch 4 (= 2 ranks x 2), 12 steps."""
    out = tmp_path_factory.mktemp("single") / "run"
    sets = COMMON + [f"data.shard_dir={shards}", "data.batch_size=4", "train.steps=12"]
    p = forkctx.Process(target=train_worker, args=("debug", sets, str(out), False, str(out) + ".log"))
    p.start(); p.join()
    assert p.exitcode == 0
    return out


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_match_single(tmp_path, shards, forkctx, reference, fsdp):
    out = tmp_path / "run"
    sets = COMMON + [f"data.shard_dir={shards}", "data.batch_size=2", "train.steps=8"]
    port = free_port()
    ps = [forkctx.Process(target=dist_worker, args=(r, 2, port, "debug", sets, str(out), fsdp)) for r in range(2)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(timeout=120)
    assert [p.exitcode for p in ps] == [0, 0]
    ref = losses(reference)
    got = losses(out)
    assert len(got) == 8
    assert got == pytest.approx(ref[:8], abs=TOL, rel=0)
    s = json.loads((out / "summary.json").read_text())
    assert (s["world_size"], s["parallel"]) == (2, "fsdp" if fsdp else "ddp")
    vr = [r["val_loss"] for r in read_metrics(reference / "metrics.jsonl") if "val_loss" in r][:2]
    vg = [r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert vg == pytest.approx(vr, abs=TOL, rel=0)

    # the 2-rank checkpoint (step 8) resumes in ONE process with batch 4 and continues the trajectory
    sets1 = COMMON + [f"data.shard_dir={shards}", "data.batch_size=4", "train.steps=12"]
    p = forkctx.Process(target=train_worker, args=("debug", sets1, str(out), True, str(tmp_path / "resume.log")))
    p.start(); p.join()
    assert p.exitcode == 0, (tmp_path / "resume.log").read_text()
    assert "resumed from" in (tmp_path / "resume.log").read_text()
    assert losses(out) == pytest.approx(ref, abs=TOL, rel=0)
