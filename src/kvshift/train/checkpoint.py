"""Checkpoints: weights in safetensors, everything else in a weights_only-loadable torch file.

    <run>/checkpoints/step_00000120/
        model.safetensors   full (unsharded) model state dict, CPU tensors
        state.pt            optimizer state (keyed by parameter name), schedule, RNG states
                            (python/numpy/torch/cuda, stored as tensors so `weights_only=True` loads
                            them), step (= data position: the loader is a pure function of the step),
                            tokens, running metrics, the resolved run config
        config.json         the run config and the ModelConfig (optional; makes the directory stand alone)
        MANIFEST.json       sha256 and size of each file; written LAST

Writing is atomic: files go into `step_XXXXXXXX.tmp/` (each via temp file + fsync + os.replace),
the manifest last, then the directory is renamed into place and its parent fsynced. A directory
without a verifying manifest is never loaded: `latest_checkpoint` skips it with a warning naming
the file, `load_checkpoint` raises ValueError naming the file and the problem. An existing good
checkpoint is never overwritten.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from kvshift.utils.io import file_sha256, fsync_dir, write_atomic

__all__ = ["save_checkpoint", "load_checkpoint", "verify_checkpoint", "latest_checkpoint", "list_checkpoints",
           "rng_state", "set_rng_state", "CheckpointError"]

FORMAT = "kvshift-ckpt-v1"
MANIFEST = "MANIFEST.json"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
CONFIG = "config.json"
_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    pass


# ---- RNG states as tensors (weights_only-loadable) --------------------------------------------
def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    d = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        d["cuda"] = torch.cuda.get_rng_state_all()
    return d


def set_rng_state(d: dict) -> None:
    p = d["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    n = d["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(d["torch"])
    if "cuda" in d and torch.cuda.is_available():
        states = d["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:  # another world size / device count: seed each device from the saved state of device 0
            for i in range(torch.cuda.device_count()):
                torch.cuda.set_rng_state(states[i % len(states)], i)


# ---- save / verify / load -----------------------------------------------------------------------
def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories under root (verified or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))


def verify_checkpoint(path: str | Path) -> dict:
    """Returns the manifest; CheckpointError (a ValueError) naming the bad file otherwise."""
    path = Path(path)
    man_path = path / MANIFEST
    if not man_path.is_file():
        raise CheckpointError(f"{man_path}: manifest missing (checkpoint incomplete or not a checkpoint)")
    try:
        man = json.loads(man_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{man_path}: corrupt manifest ({e})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT or not isinstance(man.get("files"), dict):
        raise CheckpointError(f"{man_path}: not a {FORMAT} manifest")
    for name in (WEIGHTS, STATE):
        if name not in man["files"]:
            raise CheckpointError(f"{man_path}: does not list {name}")
    for name, info in man["files"].items():
        if (not isinstance(info, dict) or not isinstance(info.get("sha256"), str)
                or not isinstance(info.get("size"), int) or isinstance(info.get("size"), bool)):
            raise CheckpointError(f"{man_path}: entry {name!r} must be a table with an integer size and a sha256 "
                                  f"string, got {info!r}")
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
            raise CheckpointError(f"{man_path}: entry {name!r} is not a file name in the checkpoint directory")
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: file missing")
        size = f.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{f}: truncated or corrupt: {size:,} bytes, manifest says {info['size']:,}")
        if file_sha256(f) != info["sha256"]:
            raise CheckpointError(f"{f}: sha256 mismatch (corrupt file)")
    return man


def save_checkpoint(root: str | Path, step: int, model_state: dict[str, torch.Tensor], train_state: dict,
                    *, keep_last: int | None = None, config: dict | None = None) -> Path:
    """Writes checkpoint `step` atomically (rank 0 only) and prunes to the newest `keep_last`.
    An existing checkpoint of the same step that verifies is kept, not overwritten. `config` (e.g.
    {"model_config": ...}) goes into config.json inside the checkpoint, so the directory stands alone
    (kvshift export reads it)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, step)
    if final.exists():
        try:
            verify_checkpoint(final)
            return final
        except CheckpointError:
            shutil.rmtree(final)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights, seen = {}, set()
    for k, v in model_state.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        # tied weights (a tied output head is the embedding itself): safetensors stores each tensor on its own
        weights[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    blob = st_save(weights, metadata={"format": FORMAT, "step": str(step)})
    write_atomic(tmp / WEIGHTS, lambda f: f.write(blob))
    write_atomic(tmp / STATE, lambda f: torch.save({"step": step, **train_state}, f))
    names = [WEIGHTS, STATE]
    if config is not None:
        write_atomic(tmp / CONFIG, lambda f: f.write((json.dumps(config, indent=1) + "\n").encode()))
        names.append(CONFIG)
    files = {n: {"sha256": file_sha256(tmp / n), "size": (tmp / n).stat().st_size} for n in names}
    man = {"format": FORMAT, "step": step, "files": files}
    write_atomic(tmp / MANIFEST, lambda f: f.write((json.dumps(man, indent=1) + "\n").encode()))
    fsync_dir(tmp)
    os.replace(tmp, final)
    fsync_dir(root)
    if keep_last:
        prune(root, keep_last)
    return final


def prune(root: str | Path, keep_last: int) -> None:
    """Keeps the newest `keep_last` verified checkpoints; removes older ones, broken ones older than
    the newest good one, and leftover staging directories."""
    root = Path(root)
    for p in root.glob("step_*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    good = []
    for p in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(p)
            good.append(p)
        except CheckpointError:
            if good:
                shutil.rmtree(p, ignore_errors=True)
    for p in good[keep_last:]:
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint whose manifest verifies; broken ones are skipped with a warning."""
    for p in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(p)
            return p
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
    return None


def load_checkpoint(path: str | Path, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state dict on CPU, train state) of a checkpoint directory; ValueError naming the file
    when it is incomplete or corrupt."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if verify:
        verify_checkpoint(path)
    try:
        weights = load_file(path / WEIGHTS)
    except Exception as e:  # safetensors raises its own error type
        raise CheckpointError(f"{path / WEIGHTS}: unreadable ({e})") from None
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path / STATE}: unreadable ({e})") from None
    return weights, state
