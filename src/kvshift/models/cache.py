"""KV cache for exact KV-shift decoding.

Per layer it holds the already-shifted (and rotated) K̂, V̂ that attention reads, plus the last
`window` RAW k and v tokens of every row: the new token's k̂ = Σ_j α_j · k_{t-j} needs raw
predecessors, not shifted ones (storing shifted ones is the bug of the paper's appendix code).
Rows share one slot index (left padding keeps them aligned); `valid` marks real (non-pad) slots and
`seen` counts each row's real tokens, which gives RoPE positions. `mixer` holds the short causal
mixers' history (kvshift.layers.mixers): per key (layer, position, stream) the last W raw inputs of
every row, (B, W, H, D), oldest first; filled by the first forward that uses the cache.
"""

from __future__ import annotations

import torch


class SlotIndex:
    """The slot bookkeeping every cache of `kvshift.LM` shares: rows share one slot index, `valid` marks real
    (non-pad) slots, `seen` counts each row's real tokens; `LM.forward` calls `begin` before the layers and
    `end` after them."""

    def _init_slots(self, batch_size: int, max_seq_len: int, device) -> None:
        self.valid = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens per row
        self.length = 0  # slots used (same for every row)
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self._pending = 0  # slots being appended by the forward in progress
        self.padded = False  # set once any call passed an attention_mask: slots may hold pads

    def begin(self, n_new: int, token_valid: torch.Tensor) -> None:
        if token_valid.shape[0] != self.batch_size:
            raise ValueError(f"batch has {token_valid.shape[0]} rows but the cache was made for {self.batch_size}")
        if self.length + n_new > self.max_seq_len:
            raise ValueError(f"sequence length {self.length + n_new} exceeds the cache's max_seq_len "
                             f"{self.max_seq_len}; make the cache with a larger max_seq_len")
        self._pending = n_new
        self.valid[:, self.length:self.length + n_new] = token_valid

    def end(self, token_valid: torch.Tensor) -> None:
        self.length += self._pending
        self.seen += token_valid.sum(dim=1)
        self._pending = 0

    def _reorder_slots(self, index: torch.Tensor, *tensor_lists: list[torch.Tensor]) -> None:
        """Select/reorder rows (beam search): the slot bookkeeping and every tensor of the given lists."""
        for lst in tensor_lists:
            for i, t in enumerate(lst):
                lst[i] = t.index_select(0, index)
        self.valid = self.valid.index_select(0, index)
        self.seen = self.seen.index_select(0, index)
        self.batch_size = int(index.numel())


class KVCache(SlotIndex):
    def __init__(self, n_layers: int, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 window: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        shape = (batch_size, max_seq_len, n_kv_heads, head_dim)
        raw_shape = (batch_size, window, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.raw_k = [torch.zeros(raw_shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.raw_v = [torch.zeros(raw_shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self._init_slots(batch_size, max_seq_len, device)
        self.window = window
        self.mixer: dict[str, torch.Tensor] = {}  # the mixers' raw history per key (kvshift.layers.mixers)
        # the compiled decode step's copy of raw_k rolled by half the head dim (kvshift.models.static_decode);
        # None everywhere else
        self.raw_k_rolled: list[torch.Tensor] | None = None

    def raw(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last `window` raw k, v tokens of each row (oldest first; zeros before the start)."""
        return self.raw_k[layer], self.raw_v[layer]

    def update(self, layer: int, k_hat: torch.Tensor, v_hat: torch.Tensor, k_raw: torch.Tensor,
               v_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append T new shifted tokens; remember the newest raw ones; return all cached K̂, V̂ so far."""
        T = k_hat.shape[1]
        s, e = self.length, self.length + T
        self.k[layer][:, s:e] = k_hat.to(self.k[layer].dtype)
        self.v[layer][:, s:e] = v_hat.to(self.v[layer].dtype)
        if self.window:
            W = self.window
            self.raw_k[layer] = torch.cat([self.raw_k[layer], k_raw.to(self.raw_k[layer].dtype)], 1)[:, -W:]
            self.raw_v[layer] = torch.cat([self.raw_v[layer], v_raw.to(self.raw_v[layer].dtype)], 1)[:, -W:]
        return self.k[layer][:, :e], self.v[layer][:, :e]

    def append_decode(self, layer: int, q: torch.Tensor, k_raw: torch.Tensor, v_raw: torch.Tensor,
                      w_k: torch.Tensor, w_v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One new token per row (B, 1, H, D): RoPE of the queries, shift + RoPE of k, shift of v, the
        cache append and the raw-state update in ONE Triton kernel; returns (RoPE(q), all cached K̂, V̂).
        Same result as `update` after the naive shift and RoPE. w_k/w_v: (H, window + 1), identity
        columns for an unshifted side (a vanilla layer: window 0, (H, 1) ones)."""
        from kvshift.ops.shift.triton import shift_rope_decode  # triton is an optional dependency (the triton extra)

        pos = self.length
        dt = self.k[layer].dtype
        q_rot, self.raw_k[layer], self.raw_v[layer] = shift_rope_decode(
            q, k_raw.to(dt), v_raw.to(dt), w_k, w_v, self.raw_k[layer].contiguous(),
            self.raw_v[layer].contiguous(), cos, sin, self.k[layer], self.v[layer], pos)
        return q_rot, self.k[layer][:, :pos + 1], self.v[layer][:, :pos + 1]

    def write_static(self, layer: int, slot: torch.Tensor, k_hat: torch.Tensor, v_hat: torch.Tensor,
                     k_raw: torch.Tensor, v_raw: torch.Tensor,
                     k_raw_rolled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`update` for one decode token (B, 1, H, D) with static shapes, for the compiled decode step
        (`kvshift.models.static_decode`): the write goes to `slot`, a (1,) long device tensor, by index,
        the raw window shifts in place (its tensors keep their addresses: a CUDA graph replays on them),
        and the WHOLE allocation comes back: the caller masks the unwritten and pad slots. No host int is
        read or changed (`length` is the caller's business)."""
        dt = self.k[layer].dtype
        self.k[layer].index_copy_(1, slot, k_hat.to(dt))
        self.v[layer].index_copy_(1, slot, v_hat.to(dt))
        if self.window:
            pairs = [(self.raw_k[layer], k_raw), (self.raw_v[layer], v_raw)]
            if self.raw_k_rolled is not None and k_raw_rolled is not None:  # in step with raw_k (k_raw rolled)
                pairs.append((self.raw_k_rolled[layer], k_raw_rolled))
            for raw, new in pairs:
                raw.copy_(torch.cat([raw[:, 1:], new.to(raw.dtype)], 1))
        return self.k[layer], self.v[layer]

    def reorder(self, index: torch.Tensor) -> None:
        """Select/reorder rows (beam search)."""
        rolled = [self.raw_k_rolled] if self.raw_k_rolled is not None else []
        self._reorder_slots(index, self.k, self.v, self.raw_k, self.raw_v, *rolled)
        for key, t in self.mixer.items():
            self.mixer[key] = t.index_select(0, index.to(t.device))
