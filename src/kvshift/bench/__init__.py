"""Benchmarks: vanilla vs KV-shift (naive and fused) attention block, training step and decode.

    kvshift bench [--only block,e2e,decode] [--steps N] [--out DIR] [--quick]

`run.run_bench(plan.Plan.full(), out)` is the programmatic entry point: `plan` holds what a run measures
(arms, shapes, presets) and the helpers the parts share, `block`, `e2e` and `decode` measure one part each
(`timing` times them), `run` runs the parts and writes and merges the results; `report` holds the targets
and the markdown table (pure functions of the result dict).
"""

from kvshift.bench.report import TARGETS, check_target, compute_targets

__all__ = ["TARGETS", "check_target", "compute_targets"]
