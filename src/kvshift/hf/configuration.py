"""`KVShiftConfig`: a transformers config carrying exactly the fields of `kvshift.ModelConfig`.

Validation is ModelConfig's (ValueError naming the field); derived values (n_kv_heads, ffn_dim) are
stored resolved, so config.json is complete. The usual transformers names (hidden_size,
num_hidden_layers, ...) are aliases, which lets generic tools (lm-eval's max length, pipelines)
read them.

Written with an explicit __init__ (the remote-code style that transformers keeps backward
compatible in 4.x and 5.x) rather than 5.x's dataclass fields.
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from kvshift.models.config import ModelConfig

MODEL_TYPE = "kvshift"
_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


class KVShiftConfig(PretrainedConfig):
    model_type = MODEL_TYPE
    attribute_map = {
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "ffn_dim",
        "max_position_embeddings": "max_seq_len",
        "rms_norm_eps": "norm_eps",
        "rope_theta": "rope_base",
        "initializer_range": "init_std",
    }

    def __init__(self, vocab_size: int = 256, dim: int = 64, n_layers: int = 2, n_heads: int = 4,
                 n_kv_heads: int | None = None, ffn_dim: int | None = None, max_seq_len: int = 512,
                 position: str = "rope", rope_base: float = 100_000.0, norm_eps: float = 1e-5,
                 tie_embeddings: bool = False, attention: str = "kvshift", shift_window: int = 1,
                 shift_impl: str = "auto", init_std: float = 0.02, mlp: str = "swiglu",
                 shift_init: str = "uniform", mixer: str = "none", canon_positions: str = "ABCD",
                 keyoffset_layers: str | list[int] | tuple[int, ...] = "all", name: str = "custom",
                 use_cache: bool = True, **kwargs):
        mc = ModelConfig(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads,
                         n_kv_heads=n_kv_heads, ffn_dim=ffn_dim, max_seq_len=max_seq_len, position=position,
                         rope_base=float(rope_base), norm_eps=float(norm_eps), tie_embeddings=bool(tie_embeddings),
                         attention=attention, shift_window=shift_window, shift_impl=shift_impl,
                         init_std=float(init_std), mlp=mlp, shift_init=shift_init, mixer=mixer,
                         canon_positions=canon_positions, keyoffset_layers=keyoffset_layers, name=name)
        for k, v in mc.to_dict().items():
            setattr(self, k, v)
        self.use_cache = use_cache
        # transformers' tying logic reads tie_word_embeddings; ours is tie_embeddings (kept equal)
        twe = kwargs.pop("tie_word_embeddings", None)
        if twe is not None and bool(twe) != mc.tie_embeddings:
            raise ValueError(f"tie_word_embeddings={twe} contradicts tie_embeddings={tie_embeddings}; set tie_embeddings")
        super().__init__(tie_word_embeddings=mc.tie_embeddings, **kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig.from_dict({k: getattr(self, k) for k in _FIELDS})

    @classmethod
    def from_model_config(cls, mc: ModelConfig, **kwargs) -> "KVShiftConfig":
        if not isinstance(mc, ModelConfig):
            raise ValueError(f"mc must be a kvshift ModelConfig, got {type(mc).__name__}")
        return cls(**mc.to_dict(), **kwargs)
