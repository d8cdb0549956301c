"""kvshift: KV Shifting Attention (Xu et al., arXiv 2411.19574, ICML 2025).

    import kvshift
    model = kvshift.LM(kvshift.ModelConfig.from_name("debug", attention="kvshift"))
    y = kvshift.kv_shift(x, weight)            # the op: x (B, T, H, D), weight (H, window+1)
    y = kvshift.causal_mix(x, weight)          # the family's op: weight (H, W+1) or per channel (H, D, W+1)
"""

from kvshift.models import ATTENTION_KINDS, LM, PRESETS, KVCache, ModelConfig
from kvshift.ops.mix import causal_mix
from kvshift.ops.shift import kv_shift

__version__ = "0.1.0"

__all__ = ["kv_shift", "causal_mix", "LM", "ModelConfig", "KVCache", "PRESETS", "ATTENTION_KINDS", "__version__"]
