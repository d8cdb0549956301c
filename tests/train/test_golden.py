"""Golden loss curve of the debug config (deterministic CPU): a refactor that changes the numerics of
the model, the optimizer, the schedule or the synthetic data shows up here. If a change is intended,
regenerate with KVSHIFT_UPDATE_GOLDEN=1 and say why in the commit. Tolerance 1e-4 absolute covers
CPU-dependent fp32 rounding (SIMD width, BLAS) over 10 steps; a real change moves losses by far more."""

import json
import os
from pathlib import Path

import pytest

from kvshift.train.config import load_config
from kvshift.train.testing import losses
from kvshift.train.trainer import train

GOLDEN = Path(__file__).parent / "assets" / "debug_losses.json"
ARMS = ["vanilla", "kvshift"]


@pytest.mark.parametrize("arm", ARMS, ids=str)
def test_debug_loss_curve(tmp_path, arm):
    train(load_config("debug", ["train.steps=10", "train.eval_every=0", f"model.attention={arm}"]),
          tmp_path, log=lambda s: None)
    got = losses(tmp_path)
    if os.environ.get("KVSHIFT_UPDATE_GOLDEN"):
        data = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        data[arm] = got
        GOLDEN.write_text(json.dumps(data, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())[arm]
    assert got == pytest.approx(want, abs=1e-4, rel=0)
