import random
import warnings

import numpy as np
import pytest
import torch

from kvshift.train.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint,
                                      rng_state, save_checkpoint, set_rng_state, verify_checkpoint)


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(5, 3, generator=g), "b": torch.randn(7, generator=g)}


def _save(root, step, seed=0, keep_last=None):
    return save_checkpoint(root, step, _state(seed), {"optimizer": {"x": torch.arange(3)}, "rng": [rng_state()]},
                           keep_last=keep_last)


def test_round_trip_weights_only(tmp_path):
    p = _save(tmp_path, 3)
    w, st = load_checkpoint(p)
    for k, v in _state(0).items():
        assert torch.equal(w[k], v)
    assert st["step"] == 3 and torch.equal(st["optimizer"]["x"], torch.arange(3))
    assert sorted(f.name for f in p.iterdir()) == ["MANIFEST.json", "model.safetensors", "state.pt"]


def test_rng_state_restores_every_generator(tmp_path):
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    p = save_checkpoint(tmp_path, 1, _state(0), {"rng": [rng_state()]})
    want = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9); np.random.seed(9); torch.manual_seed(9)
    _, st = load_checkpoint(p)  # weights_only=True inside
    set_rng_state(st["rng"][0])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


def test_keep_last_and_latest(tmp_path):
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert latest_checkpoint(tmp_path).name == "step_00000004"


@pytest.mark.parametrize("damage,problem", [
    ("truncate", "truncated"),
    ("flip", "sha256 mismatch"),
    ("no-manifest", "manifest missing"),
    ("bad-manifest", "corrupt manifest"),
    ("no-state", "file missing"),
], ids=str)
def test_corrupt_checkpoint(tmp_path, damage, problem):
    good = _save(tmp_path, 1)
    bad = _save(tmp_path, 2, seed=1)
    target = bad / ("state.pt" if damage == "no-state" else "model.safetensors")
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif damage == "flip":
        b = bytearray(target.read_bytes()); b[-3] ^= 0xFF; target.write_bytes(bytes(b))
    elif damage == "no-manifest":
        target = bad / "MANIFEST.json"; target.unlink()
    elif damage == "bad-manifest":
        target = bad / "MANIFEST.json"; target.write_text("{not json")
    else:
        target.unlink()
    # explicit load: ValueError naming the file and the problem
    with pytest.raises(ValueError) as e:
        load_checkpoint(bad)
    assert isinstance(e.value, CheckpointError)
    assert str(target) in str(e.value) and problem in str(e.value)
    # resume: the corrupt one is skipped with a warning naming the file, the older good one is used
    with pytest.warns(UserWarning, match=str(target).replace(".", r"\.")):
        assert latest_checkpoint(tmp_path) == good
    verify_checkpoint(good)


def test_good_checkpoint_never_overwritten(tmp_path):
    p = _save(tmp_path, 5, seed=0)
    _save(tmp_path, 5, seed=1)  # same step again: kept as it was
    w, _ = load_checkpoint(p)
    assert torch.equal(w["a.weight"], _state(0)["a.weight"])


def test_broken_same_step_is_replaced_and_staging_ignored(tmp_path):
    p = _save(tmp_path, 5, seed=0)
    (p / "MANIFEST.json").unlink()
    (tmp_path / "step_00000006.tmp").mkdir()  # a writer killed mid-checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert latest_checkpoint(tmp_path) is None
    _save(tmp_path, 5, seed=1)
    w, _ = load_checkpoint(p)
    assert torch.equal(w["a.weight"], _state(1)["a.weight"])


def test_load_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "step_00000001")
