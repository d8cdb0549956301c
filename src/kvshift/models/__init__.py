from kvshift.models.cache import KVCache
from kvshift.models.config import ATTENTION_KINDS, MLPS, POSITIONS, PRESETS, SHIFT_INITS, ModelConfig
from kvshift.models.lm import LM
from kvshift.models.raw_cache import RawKVCache

__all__ = ["LM", "ModelConfig", "KVCache", "RawKVCache", "PRESETS", "ATTENTION_KINDS", "POSITIONS", "MLPS", "SHIFT_INITS"]
