"""Benchmarks: vanilla vs KV-shift (naive and fused) attention block, training step and decode.

    kvshift bench [--only block,e2e,decode] [--steps N] [--out DIR] [--quick]

`run.run_bench(Plan.full(), out)` is the programmatic entry point; `report` holds the targets and
the markdown table (pure functions of the result dict).
"""

from kvshift.bench.report import TARGETS, check_target, compute_targets

__all__ = ["TARGETS", "check_target", "compute_targets"]
