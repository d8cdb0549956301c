"""Registry of named experiments: `kvshift experiment NAME` looks a name up here.

Each experiment is a function (scale, seeds, steps, out) -> summary dict that writes
results/<name>[-<scale>]/ (metrics.jsonl, summary.json, plot.png, README.md).
"""

from __future__ import annotations

from typing import Callable

EXPERIMENTS: dict[str, tuple[Callable, str]] = {}
_MODULES = ("kvshift.experiments.toy", "kvshift.experiments.landscape", "kvshift.experiments.reasoning",
            "kvshift.experiments.lm")


def register(name: str, description: str):
    def deco(fn):
        if name in EXPERIMENTS:
            raise ValueError(f"experiment {name!r} registered twice")
        EXPERIMENTS[name] = (fn, description)
        return fn
    return deco


def load_all() -> dict[str, tuple[Callable, str]]:
    import importlib
    for m in _MODULES:
        try:
            importlib.import_module(m)
        except ModuleNotFoundError as e:
            if e.name != m:
                raise
    return EXPERIMENTS


def get(name: str) -> Callable:
    load_all()
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {sorted(EXPERIMENTS)}")
    return EXPERIMENTS[name][0]
