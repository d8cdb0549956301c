"""resolve_model_dir: the one answer to "what kind of model directory is this"."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from kvshift.hf import KVShiftForCausalLM, resolve_model_dir
from kvshift.train.checkpoint import save_checkpoint


def test_kinds(lm_factory, tmp_path):
    lm = lm_factory()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model_config": lm.config.to_dict()}))
    save_checkpoint(run / "checkpoints", 3, lm.state_dict(), {})
    newest = save_checkpoint(run / "checkpoints", 5, lm.state_dict(), {})
    assert resolve_model_dir(run) == ("run", newest)

    lone = tmp_path / "lone"
    shutil.copytree(newest, lone)
    assert resolve_model_dir(lone) == ("checkpoint", lone)

    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, bare / "model.safetensors")
    (bare / "model_config.json").write_text(json.dumps(lm.config.to_dict()))
    assert resolve_model_dir(str(bare)) == ("weights", bare)

    hf = tmp_path / "hf"
    KVShiftForCausalLM.from_lm(lm).save_pretrained(hf)
    assert resolve_model_dir(hf) == ("hf", hf)


def test_errors_name_the_path(lm_factory, tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        resolve_model_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match=f"{tmp_path}: neither a run directory"):
        resolve_model_dir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_model_dir(tmp_path)
    broken = save_checkpoint(tmp_path / "checkpoints", 1, {"w": torch.zeros(2)}, {})
    (broken / "model.safetensors").write_bytes(b"corrupt")
    with pytest.warns(UserWarning, match="skipping checkpoint"), pytest.raises(ValueError, match="no complete"):
        resolve_model_dir(tmp_path)
