"""Every experiment, in the order of the report. Adding one = one module with an EXPERIMENTS list + one line here."""

from __future__ import annotations

from kvshift.experiments import (
    cost,
    downstream,
    family_probes,
    hopk,
    igsm,
    induction_control,
    landscape,
    lm,
    pipeline,
    toy,
    upcycle,
    upcycle_bench,
)
from kvshift.experiments.base import Experiment

_MODULES = (landscape, toy, induction_control, hopk, igsm, lm, family_probes, downstream, upcycle, upcycle_bench,
            cost, pipeline)
_ORDER = ("theorem2", "induction-depth", "induction-control", "induction-width", "landscape", "ngram",
          "shift-dynamics", "hopk-norepeat", "hopk", "igsm", "lm-main", "lm-seeds", "lm-lr", "lm-scaling",
          "lm-variants", "shift-coefficients", "shift-coupling", "lm-gqa", "lm-family", "family-induction",
          "family-hopk", "family-cost", "lm-downstream", "upcycle", "upcycle-benchmarks", "bench", "pipeline",
          "corpus")

EXPERIMENTS: dict[str, Experiment] = {e.name: e for m in _MODULES for e in m.EXPERIMENTS}
assert sorted(EXPERIMENTS) == sorted(_ORDER), "every experiment is listed once in _ORDER"
EXPERIMENTS = {n: EXPERIMENTS[n] for n in _ORDER}


def get(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]
