"""Model configuration: one dataclass, validated in __post_init__, with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kvshift.layers.attention import ATTENTION_KINDS, SHIFT_INITS
from kvshift.layers.mixers import CANON_POSITIONS, MIXERS, mixer_param_count
from kvshift.layers.mlp import MLPS
from kvshift.ops.shift import IMPLS

POSITIONS = ("rope", "alibi", "learned", "none")
SHIFT_WINDOWS = (1, 2, 3)


def _llama_ffn(dim: int, multiple_of: int = 64) -> int:
    hidden = int(8 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelConfig:
    """A decoder's shape and options.

    position: "rope" (rotary, the default), "alibi" (Press et al.'s linear biases), "learned" (GPT-2's
    absolute position embeddings, one vector per position 0..max_seq_len-1 added to the token embeddings
    before the first block) or "none".
    mlp: "swiglu" (Llama's gated MLP, the default) or "gelu" (GPT-2's Linear -> GELU(tanh) -> Linear); the
    model has no biases anywhere, so neither MLP has any. ffn_dim None: Llama's 8/3·dim rounded up to a
    multiple of 64 for "swiglu", 4·dim for "gelu".
    shift_init: "uniform" (the paper's draw: the first taps ~ U(0,1), the last one 1 - their sum, the
    default) or "half" (every tap of every head 1/(window+1): alpha = beta = (0.5, 0.5) for window 1).
    mixer: a short causal mixer beside any attention kind (kvshift.layers.mixers has the details, inits
    and cache state): "none" (the default); "dconv" (Primer's width-3 per-channel conv on q, k, v, identity
    init); "canon" (Canon layers, residual width-4 per-channel convs, zero init, at the positions of
    canon_positions: A attention input, B q/k/v, C MLP input, D MLP pre-activations); "keyoffset" (half
    of each key head's channels, the slowest-rotating RoPE pairs, from the previous token, in the layers of
    keyoffset_layers: "all" or layer indices; needs head_dim divisible by 4); "smear" (gated smearing of
    the previous token's embedding into the first block's input, zero init).
    canon_positions: a non-empty subset of "ABCD" (stored in that order). keyoffset_layers: "all" or a
    non-empty sequence of layer indices (stored as a sorted tuple). Both are validated for every mixer.
    """

    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: = n_heads (MHA)
    ffn_dim: int | None = None  # None: Llama's 8/3·dim rounded to 64 (mlp "swiglu"), 4·dim (mlp "gelu")
    max_seq_len: int = 512
    position: str = "rope"
    rope_base: float = 100_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention: str = "kvshift"
    shift_window: int = 1
    shift_impl: str = "auto"
    init_std: float = 0.02
    mlp: str = "swiglu"
    shift_init: str = "uniform"
    mixer: str = "none"
    canon_positions: str = "ABCD"
    keyoffset_layers: str | tuple[int, ...] = "all"
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        for f in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0:
            raise ValueError(f"n_kv_heads must be a positive int, got {self.n_kv_heads!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.mlp not in MLPS:
            raise ValueError(f"mlp must be one of {MLPS}, got {self.mlp!r}")
        if self.shift_init not in SHIFT_INITS:
            raise ValueError(f"shift_init must be one of {SHIFT_INITS}, got {self.shift_init!r}")
        if self.ffn_dim is None:
            self.ffn_dim = _llama_ffn(self.dim) if self.mlp == "swiglu" else 4 * self.dim
        if not isinstance(self.ffn_dim, int) or self.ffn_dim <= 0:
            raise ValueError(f"ffn_dim must be a positive int, got {self.ffn_dim!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"position='rope' needs an even head_dim, got dim/n_heads = {self.head_dim}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.shift_window not in SHIFT_WINDOWS:
            raise ValueError(f"shift_window must be one of {SHIFT_WINDOWS}, got {self.shift_window!r}")
        if self.shift_impl not in IMPLS:
            raise ValueError(f"shift_impl must be one of {IMPLS}, got {self.shift_impl!r}")
        if self.rope_base <= 0:
            raise ValueError(f"rope_base must be positive, got {self.rope_base}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        self._check_mixer()

    def _check_mixer(self) -> None:
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {self.mixer!r}")
        cp = self.canon_positions
        if (not isinstance(cp, str) or not cp or len(set(cp)) != len(cp)
                or not set(cp) <= set(CANON_POSITIONS)):
            raise ValueError(f"canon_positions must be a non-empty subset of {CANON_POSITIONS!r} without "
                             f"repeats, got {cp!r}")
        self.canon_positions = "".join(p for p in CANON_POSITIONS if p in cp)
        layers = self.keyoffset_layers
        if layers != "all":
            ok = not isinstance(layers, (str, bytes)) and hasattr(layers, "__iter__")
            layers = tuple(layers) if ok else ()
            ok = ok and bool(layers) and len(set(layers)) == len(layers) and all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_layers for i in layers)
            if not ok:
                raise ValueError(f"keyoffset_layers must be 'all' or a non-empty sequence of distinct layer "
                                 f"indices in [0, n_layers={self.n_layers}), got {self.keyoffset_layers!r}")
            self.keyoffset_layers = tuple(sorted(layers))
        if self.mixer == "keyoffset" and self.head_dim % 4:
            raise ValueError(f"mixer='keyoffset' needs a head_dim divisible by 4 (half of each head's key "
                             f"channels, whole RoPE pairs), got dim/n_heads = {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def shifted(self) -> bool:
        return self.attention != "vanilla"

    def non_embedding_params(self) -> int:
        """Parameters outside the embeddings and the output head (the paper's size measure). The learned
        position embeddings of position="learned" count with the embeddings, so they are not in here; the
        mixer's parameters (smear's too) are in here."""
        hd = self.head_dim
        attn = self.dim * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = (3 if self.mlp == "swiglu" else 2) * self.dim * self.ffn_dim
        shift = 0 if not self.shifted else 2 * self.n_kv_heads * (self.shift_window + 1)
        return self.n_layers * (attn + mlp + 2 * self.dim + shift) + self.dim + mixer_param_count(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; valid keys: {sorted(valid)}")
        return cls(**d)

    def replace(self, **kw) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **kw})

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], "name": name, **overrides})


# Presets. Sizes in comments are non-embedding parameters.
PRESETS: dict[str, dict] = {
    # tiny, for tests
    "debug": dict(vocab_size=97, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=128),
    # paper Fig. 1a toy model: hidden 1024, vocab 8000, length 512 (n_layers set per arm)
    "induction": dict(vocab_size=8000, dim=1024, n_layers=1, n_heads=16, ffn_dim=2816, max_seq_len=512),
    # paper Fig. 1b: hidden size 8
    "induction-narrow": dict(vocab_size=8000, dim=8, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=512),
    # one-GPU ladder (MHA, RoPE base 100k, context 1024)
    "lm-3m": dict(vocab_size=16384, dim=256, n_layers=4, n_heads=4, ffn_dim=704, max_seq_len=1024),
    "lm-10m": dict(vocab_size=16384, dim=384, n_layers=6, n_heads=6, ffn_dim=1024, max_seq_len=1024),
    "lm-25m": dict(vocab_size=16384, dim=512, n_layers=8, n_heads=8, ffn_dim=1408, max_seq_len=1024),
    "lm-50m": dict(vocab_size=16384, dim=640, n_layers=10, n_heads=10, ffn_dim=1728, max_seq_len=1024),
    "lm-85m": dict(vocab_size=16384, dim=768, n_layers=12, n_heads=12, ffn_dim=2048, max_seq_len=1024),
    # benchmark models of the fused-kernel issue
    "bench-162m": dict(vocab_size=50304, dim=768, n_layers=12, n_heads=12, ffn_dim=2048, max_seq_len=1024),
    "bench-246m": dict(vocab_size=32000, dim=1024, n_layers=16, n_heads=16, n_kv_heads=4, ffn_dim=2816,
                       max_seq_len=2048),
    # the paper's Table 6
    "paper-1.5b": dict(vocab_size=36000, dim=2048, n_layers=28, n_heads=16, ffn_dim=5504, max_seq_len=2048),
    "paper-2.9b": dict(vocab_size=48000, dim=2560, n_layers=32, n_heads=20, n_kv_heads=4, ffn_dim=8704,
                       max_seq_len=4096),
    "paper-6.7b": dict(vocab_size=36000, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008, max_seq_len=2048),
    "paper-13b": dict(vocab_size=36000, dim=5120, n_layers=40, n_heads=40, ffn_dim=13824, max_seq_len=2048),
    "paper-19b": dict(vocab_size=48000, dim=6144, n_layers=48, n_heads=48, n_kv_heads=4, ffn_dim=16384,
                      max_seq_len=12288),
}
