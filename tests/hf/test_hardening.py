"""Hostile inputs to `kvshift export` / `convert-llama` (the hardening issue): refused in one line, and a
failed export never costs the previous one."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kvshift.cli import main
from kvshift.hf.testing import tiny_tokenizer
from kvshift.train.checkpoint import save_checkpoint
from kvshift.utils.io import file_sha256


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _err(capsys, verb):
    """The error line (transformers may print a progress bar before it)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = [x for x in err.replace("\r", "\n").split("\n") if x.startswith("kvshift ")]
    assert len(lines) == 1 and lines[0].startswith(f"kvshift {verb}: error: "), err
    return lines[0]


@pytest.fixture
def run(lm_factory, tokenizer, tmp_path):
    """A run directory trained on shards made with tok.json (meta.json keeps its sha256)."""
    tok = tmp_path / "tok.json"
    tokenizer.backend_tokenizer.save(str(tok))
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "meta.json").write_text(json.dumps({"tokenizer_sha256": file_sha256(tok)}))
    lm = lm_factory(seed=3, vocab_size=len(tokenizer))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": {"kind": "shards", "shard_dir": str(shards)},
                                                 "model_config": lm.config.to_dict()}))
    save_checkpoint(run / "checkpoints", 5, lm.state_dict(), {"note": 1})
    return run, tok


# ---- 7. the tokenizer must be the one that made the shards ------------------------------------------
def test_export_refuses_another_tokenizer(run, tmp_path, capsys):
    run, tok = run
    other = tmp_path / "other.json"
    tiny_tokenizer(290).backend_tokenizer.save(str(other))
    dst = tmp_path / "hf"
    assert main(["export", str(run), str(dst), "--tokenizer", str(other)]) == 2
    err = _err(capsys, "export")
    assert "not the one the training shards were made with" in err and "meta.json" in err and str(other) in err
    assert not dst.exists()
    assert main(["export", str(run), str(dst), "--tokenizer", str(tok)]) == 0


def test_export_accepts_the_shards_tokenizer_serialised_differently(run, tmp_path, capsys):
    """Another transformers version writes the same tokenizer with other bytes: with the shards' own copy beside
    meta.json the two are compared by what they encode (a different tokenizer is still refused)."""
    import shutil

    run, tok = run
    shards = Path(json.loads((run / "config.json").read_text())["data"]["shard_dir"])
    same = tmp_path / "same.json"
    same.write_text(json.dumps(json.loads(tok.read_text()), indent=3, sort_keys=True))
    assert main(["export", str(run), str(tmp_path / "a"), "--tokenizer", str(same)]) == 2  # no copy to compare with
    _err(capsys, "export")
    shutil.copyfile(tok, shards / "tokenizer.json")
    assert main(["export", str(run), str(tmp_path / "b"), "--tokenizer", str(same)]) == 0
    other = tmp_path / "other.json"
    tiny_tokenizer(290).backend_tokenizer.save(str(other))
    assert main(["export", str(run), str(tmp_path / "c"), "--tokenizer", str(other)]) == 2
    assert "not the one the training shards were made with" in _err(capsys, "export")


# ---- staged export: a failing export keeps the previous one --------------------------------------------
def test_failed_export_keeps_the_previous_one(run, tmp_path, capsys, monkeypatch):
    run, tok = run
    dst = tmp_path / "hf"
    assert main(["export", str(run), str(dst), "--tokenizer", str(tok)]) == 0
    (dst / "README.md").write_text("my model card")
    before = _snapshot(dst)

    def full_disk(self, *a, **k):
        raise OSError(28, "No space left on device", str(dst / "tokenizer.json"))

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", full_disk)
    capsys.readouterr()  # the new export has other weights (bf16): written in place, they would show
    assert main(["export", str(run), str(dst), "--tokenizer", str(tok), "--dtype", "bfloat16"]) == 2
    assert "No space left on device" in _err(capsys, "export")
    assert _snapshot(dst) == before
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name or ".replaced-" in p.name]


def test_export_without_tokenizer_drops_the_old_tokenizer_files(run, tmp_path):
    """An export replaces the previous export as a whole: no stale tokenizer next to a new model."""
    run, tok = run
    dst = tmp_path / "hf"
    assert main(["export", str(run), str(dst), "--tokenizer", str(tok)]) == 0
    assert (dst / "tokenizer.json").is_file()
    (dst / "README.md").write_text("my model card")
    assert main(["export", str(run / "checkpoints" / "step_00000005"), str(dst)]) == 0
    assert not (dst / "tokenizer.json").exists() and (dst / "README.md").read_text() == "my model card"


@pytest.mark.parametrize("where", ["run", "checkpoint"])
def test_export_into_its_own_input_is_refused(run, capsys, where):
    run, tok = run
    ckpt = run / "checkpoints" / "step_00000005"
    dst = run if where == "run" else ckpt
    before = _snapshot(run)
    assert main(["export", str(run), str(dst)]) == 2
    assert "choose another directory" in _err(capsys, "export")
    assert _snapshot(run) == before


# ---- 5. a checkpoint manifest entry that is not a table ----------------------------------------------
def test_export_of_a_checkpoint_with_a_malformed_manifest(run, capsys):
    run, _ = run
    man_path = run / "checkpoints" / "step_00000005" / "MANIFEST.json"
    man = json.loads(man_path.read_text())
    man["files"]["model.safetensors"] = 3
    man_path.write_text(json.dumps(man))
    ckpt = man_path.parent
    assert main(["export", str(ckpt), str(run.parent / "hf")]) == 2
    assert "entry 'model.safetensors' must be a table" in _err(capsys, "export")


# ---- 7. a safetensors index whose file names leave the directory -------------------------------------
@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors"], ids=["dotdot", "absolute"])
def test_convert_llama_refuses_an_index_pointing_outside(tmp_path, capsys, name):
    cfg = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)
    src = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(src)
    w = src / "model.safetensors"
    save_file({"x": torch.zeros(1)}, tmp_path / "outside.safetensors")
    w.unlink()
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": name}}))
    capsys.readouterr()
    assert main(["convert-llama", str(src), str(tmp_path / "out")]) == 2
    err = _err(capsys, "convert-llama")
    assert "weight_map" in err and name in err and "outside" in err
    assert not (tmp_path / "out").exists()


def test_convert_llama_into_its_source_is_refused(tmp_path, capsys):
    cfg = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)
    src = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(src)
    before = _snapshot(src)
    capsys.readouterr()
    assert main(["convert-llama", str(src), str(src)]) == 2
    assert "is the input" in _err(capsys, "convert-llama")
    assert _snapshot(src) == before
