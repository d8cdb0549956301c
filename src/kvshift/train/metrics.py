"""Run records: metrics.jsonl (one JSON object per logged step), summary.json, environment facts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from kvshift.utils.io import finite, read_jsonl
from kvshift.utils.provenance import environment

__all__ = ["MetricsLog", "read_metrics", "environment", "shift_summary", "coefficients_record"]

read_metrics = read_jsonl  # the records of a metrics.jsonl


class MetricsLog:
    """Appends one JSON line per record, flushed at once (a killed run loses at most the line being
    written). `truncate_after(step)` drops records past a checkpoint when a run resumes from it, so
    the file always describes one trajectory."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._f = None

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a")
        self._f.write(json.dumps(finite(record)) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def shift_summary(model) -> dict | None:
    """Mean current/previous-token coefficients of keys (alpha) and values (beta) over all layers and
    KV heads, and the fraction of heads with alpha_cur > alpha_prev / beta_cur > beta_prev (Table 4)."""
    if not getattr(model.config, "shifted", False):
        return None
    coefs = model.shift_coefficients()  # [(alpha, beta) each (H_kv, W+1)] per layer
    a = torch.cat([c[0] for c in coefs])
    b = torch.cat([c[1] for c in coefs])
    return {"alpha_cur": a[:, 0].mean().item(), "alpha_prev": a[:, 1].mean().item(),
            "beta_cur": b[:, 0].mean().item(), "beta_prev": b[:, 1].mean().item(),
            "frac_alpha_cur_gt_prev": (a[:, 0] > a[:, 1]).float().mean().item(),
            "frac_beta_cur_gt_prev": (b[:, 0] > b[:, 1]).float().mean().item()}


def coefficients_record(model, every: int) -> dict:
    """{"coefficients": per layer {"alpha", "beta"} (n_kv_heads, window+1) lists} when `every` asks for them."""
    if not every or not getattr(model.config, "shifted", False):
        return {}
    return {"coefficients": [{"alpha": a.tolist(), "beta": b.tolist()} for a, b in model.shift_coefficients()]}
