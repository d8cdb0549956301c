import json
import os
import signal
import subprocess
import sys
import time

from kvshift.train.checkpoint import list_checkpoints, verify_checkpoint
from kvshift.train.config import load_config
from kvshift.train.metrics import read_metrics
from kvshift.train.trainer import EXIT_INTERRUPTED, train


def test_sigterm_cli_process_checkpoints_and_exits(tmp_path):
    """The real console entry point: SIGTERM mid-run -> checkpoint at the current step, exit 75."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "kvshift.cli", "train", "debug", "--out", str(out),
           "--set", "train.steps=100000", "--set", "train.ckpt_every=0", "--set", "train.eval_every=0"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(read_metrics(metrics)) >= 3:
            break
        time.sleep(0.1)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == EXIT_INTERRUPTED, err
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "interrupted" and not s["diverged"]
    ck = list_checkpoints(out / "checkpoints")
    assert len(ck) == 1 and ck[0].name == f"step_{s['steps']:08d}" and s["steps"] >= 3
    verify_checkpoint(ck[0])
    assert "resume with --resume" in err


def test_sigint_checkpoints_then_resumes(tmp_path):
    out = tmp_path / "run"

    def ctrl_c(step, rec):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = load_config("debug", ["train.steps=8", "train.ckpt_every=0"])
    s = train(cfg, out, on_step=ctrl_c, log=lambda s: None)
    assert s["status"] == "interrupted" and s["steps"] == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    s = train(cfg, out, resume=True, log=lambda s: None)
    assert s["status"] == "finished" and s["resumed_from"].endswith("step_00000004")
