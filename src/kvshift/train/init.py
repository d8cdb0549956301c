"""`train.init_from`: start a run from pretrained weights instead of LM(config, seed)'s init.

    info = init_from(model, path)

`path` is a model directory holding `model.safetensors` (or a safetensors index):
  * a transformers KVShiftForCausalLM directory (`kvshift export`, `kvshift convert-llama`): keys
    "model.<LM key>",
  * a training checkpoint directory (kvshift.train.checkpoint) or a run directory (its newest checkpoint
    that verifies): keys "<LM key>".

Every weight of the run's model must be in the source with the same shape (the [model] section must
describe the source's architecture); the attention kind may differ, so one converted model starts
every arm of an upcycling comparison:
  * a shift coefficient the run has and the source lacks (a vanilla source, or K-only -> KV) starts at
    the identity shift (current token 1, others 0: the source's function exactly; gate kinds cannot
    hold the identity and are refused);
  * a shift coefficient the source has and the run lacks (a KV-shift source into a vanilla or K-only
    run) is dropped only when it is the identity, since dropping any other would change the model.

Only a fresh start reads `init_from`: a resumed run restores its checkpoint (the same weights, optimizer
and RNG as an uninterrupted run: resume stays exact), and `init_from` is part of the config that
--resume compares. The source's sha256 goes into summary.json (`init_from`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kvshift.layers.attention import identity_coefficients
from kvshift.train.checkpoint import MANIFEST, WEIGHTS, latest_checkpoint
from kvshift.utils.io import file_sha256

__all__ = ["init_from", "init_weights_file"]

SHIFT_NAMES = ("shift_k", "shift_v")
_PREFIXES = ("_orig_mod.", "module.")


def init_weights_file(path: str | Path) -> list[Path]:
    """The safetensors file(s) of a model directory, run directory or checkpoint directory; ValueError
    naming the path when there are none."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"train.init_from = {str(path)!r}: no such directory")
    if p.is_file():
        raise ValueError(f"train.init_from = {str(path)!r}: a file; give the model directory that holds "
                         f"{WEIGHTS} (a `kvshift convert-llama` / `kvshift export` output, a run or a checkpoint)")
    if (p / "checkpoints").is_dir() and not (p / WEIGHTS).is_file():
        ck = latest_checkpoint(p / "checkpoints")
        if ck is None:
            raise ValueError(f"train.init_from = {str(path)!r}: a run directory without a checkpoint that verifies")
        p = ck
    if (p / WEIGHTS).is_file():
        return [p / WEIGHTS]
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index}: not a safetensors index") from None
        files = [p / n for n in names]
        if any("/" in n or n.startswith(".") or not f.is_file() for n, f in zip(names, files)):
            raise ValueError(f"{index}: names a missing or unsafe file")
        return files
    raise ValueError(f"train.init_from = {str(path)!r}: no {WEIGHTS} (nor an index) there")


def _source_state(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    raw: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            raw.update(load_file(f))
        except Exception as e:  # safetensors raises its own error type
            raise ValueError(f"{f}: unreadable safetensors file ({e})") from None
    hf = any(k.startswith("model.") for k in raw)
    out = {}
    for k, v in raw.items():
        if hf:
            if not k.startswith("model."):
                continue  # e.g. a separate lm_head alias; the LM keys are under model.
            k = k[len("model."):]
        for pre in _PREFIXES:
            while k.startswith(pre):
                k = k[len(pre):]
        out[k] = v
    return out


def _is_identity(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.float(), identity_coefficients(t.shape[0], t.shape[1] - 1)))


@torch.no_grad()
def init_from(model, path: str | Path) -> dict:
    """Loads the weights of `path` into `model` (a kvshift.LM, before wrapping); returns a record
    {path, files, sha256, identity_filled, identity_dropped}. ValueError naming the path when the source
    does not fit the model (missing or extra weights, shapes, a non-identity shift to drop)."""
    files = init_weights_file(path)
    src = _source_state(files)
    want = model.state_dict()
    if model.config.tie_embeddings:
        src.setdefault("output.weight", src.get("tok_embeddings.weight"))
        if src.get("output.weight") is not None and "tok_embeddings.weight" in src and not torch.equal(
                src["output.weight"], src["tok_embeddings.weight"]):
            raise ValueError(f"train.init_from = {str(path)!r}: untied output and embedding weights, but the "
                             f"run's model ties them (model.tie_embeddings)")
    filled, dropped, problems = [], [], []
    sd = {}
    for k, t in want.items():
        leaf = k.rsplit(".", 1)[-1]
        if k not in src or src[k] is None:
            if leaf in SHIFT_NAMES:
                sd[k] = identity_coefficients(t.shape[0], t.shape[1] - 1).to(t.dtype)
                filled.append(k)
            else:
                problems.append(f"missing {k}")
            continue
        if tuple(src[k].shape) != tuple(t.shape):
            problems.append(f"{k}: shape {tuple(src[k].shape)} in the source, {tuple(t.shape)} in the run's model")
            continue
        sd[k] = src[k].to(t.dtype)
    for k in sorted(set(src) - set(want)):
        leaf = k.rsplit(".", 1)[-1]
        if leaf in SHIFT_NAMES and _is_identity(src[k]):
            dropped.append(k)
        elif leaf in SHIFT_NAMES:
            problems.append(f"{k} is not the identity shift, and the run's attention kind "
                            f"({model.config.attention}) has no such coefficient")
        elif leaf.endswith("_gate"):
            problems.append(f"{k}: a gate coefficient (cannot start from or become the identity)")
        else:
            problems.append(f"unexpected {k}")
    if any(n.endswith("_gate") for n, _ in model.named_parameters()):
        problems.append(f"attention {model.config.attention!r} has gate coefficients, which cannot hold the identity "
                        f"shift; use a kind from kvshift.layers.attention.IDENTITY_KINDS")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} problems)" if len(problems) > 6 else "")
        raise ValueError(f"train.init_from = {str(path)!r} does not fit the run's model "
                         f"(the [model] section must describe the source's architecture): {shown}")
    model.load_state_dict(sd)
    return {"path": str(path), "files": [f.name for f in files], "sha256": [file_sha256(f) for f in files],
            "identity_filled": len(filled), "identity_dropped": len(dropped)}
