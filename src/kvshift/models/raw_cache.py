"""`RawKVCache`: a standard KV cache (rotated raw keys, raw values) for a KV-shift `kvshift.LM`.

It holds exactly what a vanilla model's cache holds; the KV shift is applied when attention reads
the cache (`kvshift.layers.stateless`). Unlike `kvshift.KVCache` (shifted K̂/V̂ plus the last raw
k/v of every row, updated in place), it can therefore be rolled back (`crop`, speculative decoding)
and reordered (`reorder`, beam search) with no extra state.

`LM.generate` keeps `KVCache` as its default (`generate(..., stateless=True)` uses this cache): on an
H200 at batch 128 the stateless steps took 1.66x (2k prompt) and 3.10x (8k) the `KVCache`'s through the
PyTorch read, and 1.72x (batch 16, 2k prompt) and 1.51x (batch 128, 8k; one job) through the flash-decoding kernel
that a one-token step on CUDA now takes (`kvshift.layers.stateless_kernel`). On one CPU thread,
lm-3m, 4 rows, 64 + 192 tokens greedy: 0.97 s with `KVCache`, 1.4 s with `RawKVCache`. Use a
`RawKVCache` (pass it as `cache=` to `LM.forward`) where rollback or a standard layout matters; the
transformers adapter (`kvshift.hf`) uses transformers' own caches with the same read.

Rows share one slot index (left padding keeps them aligned); `valid` marks real (non-pad) slots.
"""

from __future__ import annotations

import torch

from kvshift.layers.stateless import rotation_tables, slot_positions
from kvshift.models.cache import SlotIndex


class RawKVCache(SlotIndex):
    stateless = True  # Attention.forward reads this cache through kvshift.layers.stateless

    def __init__(self, n_layers: int, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, *,
                 rope_base: float = 100_000.0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        for name, v in (("n_layers", n_layers), ("batch_size", batch_size), ("max_seq_len", max_seq_len),
                        ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)  # the layout of transformers' caches
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self._init_slots(batch_size, max_seq_len, device)
        self.head_dim, self.rope_base = head_dim, rope_base
        self._pos: torch.Tensor | None = None  # slot positions of the forward in progress
        self._rot: dict = {}

    @classmethod
    def for_model(cls, lm, batch_size: int, max_seq_len: int | None = None, *, dtype=None,
                  device=None) -> "RawKVCache":
        """A cache sized for `lm` (a kvshift.LM): max_seq_len defaults to the model's."""
        cfg = lm.config
        p = lm.output.weight
        return cls(cfg.n_layers, batch_size, max_seq_len or cfg.max_seq_len, cfg.n_kv_heads, cfg.head_dim,
                   rope_base=cfg.rope_base, dtype=dtype or p.dtype, device=device or p.device)

    # ---- the interface LM.forward uses (as kvshift.KVCache's) ---------------------------------
    def begin(self, n_new: int, token_valid: torch.Tensor) -> None:
        super().begin(n_new, token_valid)
        self._pos = slot_positions(self.valid[:, : self.length + n_new])

    def end(self, token_valid: torch.Tensor) -> None:
        super().end(token_valid)
        self._pos = None

    # ---- the interface of the stateless read ---------------------------------------------------
    def update(self, layer: int, c_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append T new rotated raw keys / raw values (B, H_kv, T, D); return all cached so far (B, H_kv, S, D)."""
        T = c_new.shape[2]
        s, e = self.length, self.length + T
        if e > self.max_seq_len:
            raise ValueError(f"sequence length {e} exceeds the cache's max_seq_len {self.max_seq_len}")
        self.k[layer][:, :, s:e] = c_new.to(self.k[layer].dtype)
        self.v[layer][:, :, s:e] = v_new.to(self.v[layer].dtype)
        return self.k[layer][:, :, :e], self.v[layer][:, :, :e]

    def slot_positions(self) -> torch.Tensor:
        """(B, S) position of each slot inside its row's real tokens (-1 at pads), S = slots after this forward."""
        if self._pos is None:
            return slot_positions(self.valid[:, : self.length])
        return self._pos

    def rotation(self, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (width, str(device))
        if key not in self._rot:
            self._rot[key] = rotation_tables(width - 1, self.head_dim, self.rope_base, device=device)
        return self._rot[key]

    # ---- rollback and reordering ---------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.length

    def crop(self, length: int) -> None:
        """Keep the first `length` slots (a negative value removes that many from the end, as
        transformers' caches do): rejected speculative tokens are simply forgotten."""
        if isinstance(length, bool) or not isinstance(length, int):
            raise ValueError(f"length must be an int, got {length!r}")
        n = self.length + length if length < 0 else length
        if not 0 <= n <= self.length:
            raise ValueError(f"length must keep between 0 and {self.length} slots, got {length}")
        self.valid[:, n:] = False
        self.length = n
        self.seen = self.valid[:, :n].sum(1)

    def reorder(self, index: torch.Tensor) -> None:
        """Select/reorder rows (beam search)."""
        self._reorder_slots(index, self.k, self.v)
