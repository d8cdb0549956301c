"""Which implementation runs the KV shift: the `impl` names and the one "use the Triton kernels?" rule."""

from __future__ import annotations

import torch

__all__ = ["IMPLS", "triton_available", "use_triton"]

# "auto": the fused Triton kernels on CUDA when available, else naive; "naive": the reference; "triton": fused
IMPLS = ("auto", "naive", "triton")


def triton_available() -> bool:
    """True when the fused Triton kernels can be imported (CUDA or TRITON_INTERPRET=1)."""
    try:
        from . import triton as _t  # noqa: F401  (triton is an optional dependency: the triton extra)
    except Exception:
        return False
    return _t.is_available()


def use_triton(impl: str, x: torch.Tensor) -> bool:
    """Whether `impl` runs the fused Triton kernels for tensors like x: "triton" always, "auto" on CUDA
    when the kernels are available, "naive" never."""
    return impl == "triton" or (impl == "auto" and x.is_cuda and triton_available())
