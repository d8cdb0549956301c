from kvshift.models.cache import KVCache
from kvshift.models.config import ATTENTION_KINDS, MLPS, POSITIONS, PRESETS, SHIFT_INITS, ModelConfig
from kvshift.models.lm import LM

__all__ = ["LM", "ModelConfig", "KVCache", "PRESETS", "ATTENTION_KINDS", "POSITIONS", "MLPS", "SHIFT_INITS"]
