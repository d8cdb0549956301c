"""What a model directory is, and the model config and weights of a kvshift training run or checkpoint.

    kind, path = resolve_model_dir(directory)

    "run"         a training run: checkpoints/step_XXXXXXXX/ below it (kvshift.train.checkpoint); `path` is
                  its newest checkpoint whose manifest verifies
    "hf"          a transformers model directory: config.json with a model_type (`kvshift export`,
                  `kvshift convert-llama`, or any other save_pretrained causal LM); `path` is the directory
    "checkpoint"  model.safetensors with a MANIFEST.json (a checkpoint directory, e.g. one taken out of its run)
    "weights"     model.safetensors without a manifest; the model config in model_config.json or config.json

The model config of a run, checkpoint or weights directory is looked up in the checkpoint directory
(config.json holding ModelConfig fields or a "model_config" entry, or model_config.json), then in the
run directory's config.json.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvshift.models.config import ModelConfig
from kvshift.train.checkpoint import MANIFEST, WEIGHTS, latest_checkpoint, verify_checkpoint
from kvshift.utils.io import read_json

__all__ = ["MODEL_DIR_KINDS", "resolve_model_dir", "load_training_checkpoint"]

MODEL_DIR_KINDS = ("run", "hf", "checkpoint", "weights")


def _is_hf_config(cfg: Path) -> bool:
    if not cfg.is_file():
        return False
    d = read_json(cfg)
    return isinstance(d, dict) and d.get("model_type") is not None


def resolve_model_dir(path: str | Path) -> tuple[str, Path]:
    """(kind, directory holding the weights) of a model directory (see the module docstring); ValueError
    naming the path when it is none of them."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory")
    if (path / "checkpoints").is_dir():
        ckpt = latest_checkpoint(path / "checkpoints")
        if ckpt is None:
            raise ValueError(f"{path / 'checkpoints'}: no complete checkpoint")
        return "run", ckpt
    if _is_hf_config(path / "config.json"):
        return "hf", path
    if (path / WEIGHTS).is_file():
        return ("checkpoint" if (path / MANIFEST).is_file() else "weights"), path
    raise ValueError(f"{path}: neither a run directory (with checkpoints/), a checkpoint directory (with "
                     f"{WEIGHTS}) nor a transformers model directory (config.json with a model_type)")


def _model_config_from_json(path: Path) -> ModelConfig | None:
    if not path.is_file():
        return None
    d = read_json(path)
    if isinstance(d, dict) and isinstance(d.get("model_config"), dict):
        return ModelConfig.from_dict(d["model_config"])
    if isinstance(d, dict) and {"dim", "n_layers", "vocab_size"} <= set(d):
        return ModelConfig.from_dict(d)
    return None


def load_training_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """(model config, LM state dict, info) of a run, checkpoint or weights directory; info has the
    checkpoint path, its step (when known) and a tokenizer path found next to it (or None)."""
    from safetensors.torch import load_file  # optional dependency (the hf and train extras)

    kind, ckpt = resolve_model_dir(path)
    if kind == "hf":
        raise ValueError(f"{path}: a transformers model directory, not a kvshift training run or checkpoint")
    if kind == "checkpoint":  # a run's checkpoint was verified when it was picked
        verify_checkpoint(ckpt)  # ValueError naming the bad file
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    mc = _model_config_from_json(ckpt / "config.json") or _model_config_from_json(ckpt / "model_config.json")
    run_cfg = {}
    if run is not None and (run / "config.json").is_file():
        run_cfg = read_json(run / "config.json")  # a ValueError naming the file
        mc = mc or _model_config_from_json(run / "config.json")
    if mc is None:
        raise ValueError(f"{ckpt}: no model config found (looked for config.json or model_config.json there"
                         + (f" and {run / 'config.json'}" if run is not None else "") + ")")
    try:
        state = load_file(ckpt / WEIGHTS)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{ckpt / WEIGHTS}: unreadable ({e})") from None
    tokenizer = None
    for cand in [ckpt / "tokenizer.json"] + ([run / "tokenizer.json"] if run is not None else []):
        if cand.is_file():
            tokenizer = cand
            break
    tok_cfg = (run_cfg.get("data") or {}).get("tokenizer") if isinstance(run_cfg, dict) else None
    if tokenizer is None and tok_cfg and Path(tok_cfg).exists():
        tokenizer = Path(tok_cfg)
    step = int(ckpt.name.split("_")[1]) if ckpt.name.startswith("step_") and ckpt.name[5:].isdigit() else None
    shard_dir = (run_cfg.get("data") or {}).get("shard_dir") if isinstance(run_cfg, dict) else None
    return mc, state, {"checkpoint": str(ckpt), "step": step, "tokenizer": str(tokenizer) if tokenizer else None,
                       "shard_meta": str(Path(shard_dir) / "meta.json") if shard_dir else None}
