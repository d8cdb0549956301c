"""kvshift: KV Shifting Attention (Xu et al., arXiv 2411.19574, ICML 2025)."""

from kvshift.ops.shift import kv_shift

__version__ = "0.1.0"

__all__ = ["kv_shift", "__version__"]
