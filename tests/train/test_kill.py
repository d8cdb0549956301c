"""SIGKILL a training process at >= 20 random moments (checkpoint every step, file writes stretched
so many kills land mid-write), resuming each time; the finished run must equal an uninterrupted one
bit for bit, and every launch must resume from the newest good checkpoint."""

import os
import random
import re
import signal
import time
import warnings

from kvshift.train.checkpoint import latest_checkpoint
from kvshift.train.metrics import read_metrics
from kvshift.train.testing import losses, train_worker

SETS = ["train.steps=120", "train.ckpt_every=1", "train.keep_last=2", "train.eval_every=30"]  # long enough for 20 kills
KILLS = 20


def _latest_step(root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = latest_checkpoint(root)
    return int(p.name.split("_")[1]) if p else None


def _launch(ctx, run, log, delay):
    p = ctx.Process(target=train_worker, args=("debug", SETS, str(run), True, str(log), delay))
    p.start()
    return p


def test_sigkill_at_random_moments(tmp_path, forkctx):
    ref = tmp_path / "ref"
    p = forkctx.Process(target=train_worker, args=("debug", SETS, str(ref), False, str(tmp_path / "ref.log")))
    p.start(); p.join()
    assert p.exitcode == 0, (tmp_path / "ref.log").read_text()

    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    rng = random.Random(1234)
    kills = midwrite = resumed = 0
    max_delay = 0.5  # adapted so a launch makes ~1-3 steps of progress on any machine
    for attempt in range(200):
        if kills >= KILLS:
            break
        expected = _latest_step(ckpts)
        log = tmp_path / f"launch{attempt}.log"
        p = _launch(forkctx, run, log, delay=0.004)
        time.sleep(rng.uniform(0.0, max_delay))
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            kills += 1
        p.join()
        code = p.exitcode
        p.close()
        assert code in (0, -signal.SIGKILL), log.read_text() if log.exists() else code
        finished = code == 0
        if any(ckpts.glob("step_*.tmp")):
            midwrite += 1
        text = log.read_text() if log.exists() else ""
        m = re.search(r"resumed from \S+ at step (\d+)", text)
        if m:
            resumed += 1
            assert int(m.group(1)) == expected, (attempt, text)
        elif "from scratch" in text:
            assert expected is None
        now = _latest_step(ckpts) or 0
        if now - (expected or 0) > 3:
            max_delay *= 0.7
        elif now == (expected or 0):
            max_delay = min(2.0, max_delay * 1.3)
        if finished:
            break
    assert kills >= KILLS, f"the run finished after only {kills} kills: make it longer"
    assert midwrite >= 1 and resumed >= KILLS // 2, (midwrite, resumed)

    p = _launch(forkctx, run, tmp_path / "final.log", delay=0.0)
    p.join()
    assert p.exitcode == 0, (tmp_path / "final.log").read_text()
    assert losses(run) == losses(ref)
    assert [r.get("val_loss") for r in read_metrics(run / "metrics.jsonl")] == \
           [r.get("val_loss") for r in read_metrics(ref / "metrics.jsonl")]
    print(f"kills {kills}, launches {attempt + 1}, mid-checkpoint-write {midwrite}, resumed {resumed}")
