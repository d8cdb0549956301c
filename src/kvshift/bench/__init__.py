"""Benchmarks: vanilla vs KV-shift attention block (as a model runs it), decoding through generate, training step.

    kvshift bench [--only attn,generate,e2e] [--steps N] [--out DIR] [--quick]

`run.run_bench(plan.Plan.full(), out)` is the programmatic entry point: `plan` holds what a run measures
(arms, shapes, presets) and the helpers the parts share, `attn`, `generate` and `e2e` measure one part each
(`block` and `decode`, superseded, are kept runnable; `report` says why they misled)
(`timing` times them), `run` runs the parts and writes and merges the results; `report` holds the targets
and the markdown tables (pure functions of the result dict, with `report_parts`).
"""

from kvshift.bench.report import TARGETS, check_target, compute_targets

__all__ = ["TARGETS", "check_target", "compute_targets"]
