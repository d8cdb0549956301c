from kvshift.models.cache import KVCache
from kvshift.models.config import ATTENTION_KINDS, PRESETS, ModelConfig
from kvshift.models.lm import LM

__all__ = ["LM", "ModelConfig", "KVCache", "PRESETS", "ATTENTION_KINDS"]
