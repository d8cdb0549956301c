"""Where a launch of `kvshift train` starts, decided before anything in the run directory is written.

    plan = start_plan(out, cfg, resume=True)        # rank 0: {"ckpt", "skipped", "error"}; never raises
    check_resumed_config(ckpt, state, cfg, mcfg, world_size)   # every rank: UserError or nothing

The rules (docs/reliability.md has the table and the tests):

* Without --resume, a run directory that holds checkpoints is refused (resuming is explicit).
* With --resume, the newest checkpoint whose manifest verifies is loaded; broken newer ones are
  skipped with a line naming the file. When checkpoints exist but none verifies, the launch is
  refused: restarting from step 0 would truncate the run's metrics.jsonl.
* With no checkpoint at all (with or without --resume), a metrics.jsonl that records steps past the
  first checkpoint the run would have written is refused too: its checkpoints were removed, or
  --out is another run. Records up to that step are a run killed before its first checkpoint:
  starting from scratch loses nothing, and the records are rewritten identically.
* A resumed launch must keep the model, the data stream and the optimizer of the checkpoint: a
  difference in any key outside `MAY_CHANGE` is refused with one line naming the keys. The global
  batch (data.batch_size x data.grad_accum x world size) must stay the same; how it is split may
  change. train.steps, the eval/checkpoint/log cadence and execution settings may change.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from kvshift.errors import UserError, one_line
from kvshift.models import ModelConfig
from kvshift.train.checkpoint import (
    CONFIG,
    CheckpointError,
    list_checkpoints,
    verify_checkpoint,
)
from kvshift.train.config import SECTIONS, RunConfig
from kvshift.utils.io import read_jsonl

__all__ = ["MAY_CHANGE", "start_plan", "check_resumed_config", "config_changes"]

# keys whose value may differ between the launches of one run
MAY_CHANGE = {
    "model": {"name", "shift_impl"},  # a label; the kernel that computes the same function
    "data": {"per_domain", "val_windows", "tokenizer", "batch_size", "grad_accum"},  # global batch checked apart
    "optim": {"fused"},
    "train": {"steps", "eval_every", "eval_batches", "ckpt_every", "keep_last", "log_every", "progress",
              "shift_stats", "compile", "dtype", "deterministic", "device", "threads", "diverge_factor",
              "diverge_after", "peak_flops"},
}


def _restart_hint(out: Path) -> str:
    return f"to start this run afresh, choose another --out (or move {out / 'checkpoints'} and {out / 'metrics.jsonl'} away)"


def _orphan_metrics(out: Path, cfg, resume: bool) -> str | None:
    """An error when metrics.jsonl records steps past the run's first checkpoint but no checkpoint exists."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return None
    try:
        recs = read_jsonl(path)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a metrics file (not UTF-8 JSON lines); move it away to start this run") from None
    steps = [r["step"] for r in recs if isinstance(r, dict) and isinstance(r.get("step"), int)]
    if not steps:
        return None
    due = [min(cfg.train.ckpt_every or cfg.train.steps, cfg.train.steps)]
    try:  # the cadence of the launch that wrote the records, when it differs
        t = json.loads((out / "config.json").read_text())["train"]
        due.append(min(t["ckpt_every"] or t["steps"], t["steps"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    first = max(due)
    if max(steps) <= first:
        return None  # killed before its first checkpoint: nothing to keep
    return (f"{'--resume: ' if resume else ''}{out} has no checkpoint, but its metrics.jsonl records {len(steps)} "
            f"steps up to step {max(steps)} (the first checkpoint was due at step {first}): its checkpoints were "
            f"removed or --out is another run; nothing was changed. To start afresh, remove {path} "
            f"(or choose another --out)")


def start_plan(out: str | Path, cfg, *, resume: bool) -> dict:
    """{"ckpt": checkpoint directory to resume from or None, "skipped": [problems of newer broken
    checkpoints], "error": a refusal (one line) or None}. Reads only and never raises (an unreadable
    file is an "error"): call it on rank 0 and broadcast the result, so every rank refuses together."""
    try:
        return _start_plan(Path(out), cfg, resume)
    except (ValueError, OSError) as e:
        return {"ckpt": None, "skipped": [], "error": one_line(e)}


def _start_plan(out: Path, cfg, resume: bool) -> dict:
    root = out / "checkpoints"
    ckpts = list_checkpoints(root)
    plan: dict = {"ckpt": None, "skipped": [], "error": None}
    if ckpts and not resume:
        plan["error"] = (f"{out} already holds checkpoints from an earlier run: pass --resume to continue it, "
                         f"or choose another --out")
        return plan
    if not ckpts:
        plan["error"] = _orphan_metrics(out, cfg, resume)
        return plan
    for p in reversed(ckpts):
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            plan["skipped"].append(str(e))
            continue
        plan["ckpt"] = str(p)
        return plan
    plan["error"] = (f"--resume: none of the {len(ckpts)} checkpoints in {root} verifies "
                     f"({'; '.join(plan['skipped'])}); nothing was changed. Restore or repair them to resume; "
                     + _restart_hint(out))
    return plan


def _stored_config(ckpt: Path, state: dict) -> dict:
    """The run config a checkpoint was written with: its config.json (with "model_config"), else the
    copy in state.pt."""
    p = ckpt / CONFIG
    if p.is_file():
        d = json.loads(p.read_text())
        if isinstance(d, dict) and "model" in d:
            return d
    raw = state.get("config")
    d = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(d, dict):
        raise UserError(f"{ckpt}: holds no run config to compare this launch with")
    return d


def _model_config_of(d: dict) -> dict | None:
    """The stored model config with today's defaults for fields an older version did not write."""
    try:
        if isinstance(d.get("model_config"), dict):
            return ModelConfig.from_dict(d["model_config"]).to_dict()
        return RunConfig.from_dict({k: v for k, v in d.items() if k in ("model", "data", "optim", "train")}
                                   ).model_config().to_dict()
    except ValueError:
        return None


def _show(v) -> str:
    return json.dumps(v) if not isinstance(v, str) else repr(v)


def config_changes(old: dict, new: dict, old_world: int, new_world: int) -> list[str]:
    """'section.key old -> new' for every difference outside MAY_CHANGE; `old`/`new` are
    RunConfig.to_dict() with "model_config"."""
    out = []
    om, nm = _model_config_of(old), new["model_config"]
    if om is None:  # compare what was written
        om, nm = old.get("model") or {}, new["model"]
    for k in sorted(set(om) | set(nm)):
        if k not in MAY_CHANGE["model"] and om.get(k) != nm.get(k):
            out.append(f"model.{k} {_show(om.get(k))} -> {_show(nm.get(k))}")
    for sec, klass in SECTIONS.items():
        o, n = old.get(sec) or {}, new[sec]
        defaults = {f.name: f.default for f in dataclasses.fields(klass)}  # keys an older version lacked
        for k in n:
            if k in MAY_CHANGE[sec]:
                continue
            ov = o.get(k, defaults.get(k))
            if isinstance(ov, (list, tuple)):
                ov = list(ov)
            nv = list(n[k]) if isinstance(n[k], (list, tuple)) else n[k]
            if ov != nv:
                out.append(f"{sec}.{k} {_show(ov)} -> {_show(nv)}")
    od, nd = old.get("data") or {}, new["data"]
    try:
        ob = int(od["batch_size"]) * int(od.get("grad_accum", 1)) * int(old_world)
    except (KeyError, TypeError, ValueError):
        ob = None
    nb = nd["batch_size"] * nd["grad_accum"] * new_world
    if ob is not None and ob != nb:
        out.append(f"global batch (data.batch_size x data.grad_accum x world size) "
                   f"{od['batch_size']}x{od.get('grad_accum', 1)}x{old_world}={ob} -> "
                   f"{nd['batch_size']}x{nd['grad_accum']}x{new_world}={nb}")
    return out


def check_resumed_config(ckpt: str | Path, state: dict, cfg, mcfg, world_size: int) -> None:
    """UserError naming every key in which this launch differs from the checkpoint's run config
    (outside MAY_CHANGE). Same inputs on every rank, so every rank gives the same verdict."""
    ckpt = Path(ckpt)
    old = _stored_config(ckpt, state)
    new = {**cfg.to_dict(), "model_config": mcfg.to_dict()}
    changes = config_changes(old, new, int(state.get("world_size", world_size)), world_size)
    if changes:
        raise UserError(f"--resume: this launch's config differs from the one {ckpt} was trained with: "
                        f"{'; '.join(changes)}. Nothing was changed: resume with the original values (model, "
                        f"data and optimizer settings are fixed for a run; train.steps and the eval/checkpoint "
                        f"cadence may change), or start a new run with another --out")
