"""Shared test set-up: deterministic CPU runs and NaN-poisoned uninitialised tensors.

torch.empty / torch.empty_like results are filled with NaN, so an output element a kernel forgot
to write fails the comparison loudly instead of passing with leftover memory.
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("KVSHIFT_TEST", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

_empty, _empty_like = torch.empty, torch.empty_like


def _poison(t):
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(_empty_like(*a, **k)))
    yield

# Triton reads TRITON_INTERPRET when kernels are first defined: on a machine without CUDA, run the
# fused kernels through the interpreter whatever test imports them first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def dev_script():
    """Loads a module of scripts/dev/ (not a package) by path: `dev_script("decode_sweep")`."""
    return _load_dev_script


def _load_dev_script(name: str):
    path = Path(__file__).resolve().parents[1] / "scripts" / "dev" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
