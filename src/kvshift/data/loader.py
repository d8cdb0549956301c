"""Packed batches over token shards: a pure function of (seed, step, rank), with document boundaries.

The split's token stream is cut into fixed windows of T+1 tokens with stride T (window w covers
tokens [w*T, w*T + T], so every token is a label exactly once per epoch). Epoch e visits the
windows in the order of a permutation seeded by (seed, e). Global sample g = step * world_size * B
+ rank * B + b takes window perm_e[g mod n_windows] with e = g // n_windows. Nothing is carried
between calls, so `batch(step)` can be called for any step in any order (resume = call with the
next step), and ranks never share a window within an epoch.

Batches carry document structure so a model can reset attention and the KV shift at document
starts: `position_ids` (B, T) is the position inside the document (0 at the <eos> that opens each
document, and 0 at every row start unless `continue_rows`), `cu_seqlens` (int32) are the segment
boundaries of the flattened (1, B*T) packed form, and `domain_ids` (B, T) the domain of each input
token's document (for per-domain validation loss).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from kvshift.data.shards import Shards

__all__ = ["PackedLoader", "ValidationSet", "make_batch", "domain_loss_sums"]


def make_batch(sh: Shards, starts: np.ndarray, seq_len: int, *, continue_rows: bool = False) -> dict:
    """Rows tokens[s : s + T + 1] for each start s -> a packed batch dict of torch tensors."""
    T = seq_len
    starts = np.asarray(starts, dtype=np.int64)
    B = starts.size
    pos_abs = starts[:, None] + np.arange(T + 1, dtype=np.int64)  # (B, T+1)
    rows = np.asarray(sh.tokens[pos_abs.reshape(-1)], dtype=np.int64).reshape(B, T + 1)
    p = pos_abs[:, :T]  # (B, T) absolute positions of the inputs
    seg = np.searchsorted(sh.offsets[:-1], p, side="right") - 1  # (B, T) document index of each input
    position = p - sh.offsets[seg]
    if not continue_rows:
        position = np.minimum(position, np.arange(T, dtype=np.int64))
    flat = position.reshape(-1)
    # segment starts of the flattened form: documents starts and always row starts (rows are not contiguous)
    is_start = flat == 0
    is_start[::T] = True
    cu = np.append(np.flatnonzero(is_start), B * T).astype(np.int32)
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(rows[:, :T])),  # (B, T) int64
        "labels": torch.from_numpy(np.ascontiguousarray(rows[:, 1:])),  # (B, T) int64
        "position_ids": torch.from_numpy(position),  # (B, T) int64
        "cu_seqlens": torch.from_numpy(cu),  # (S+1,) int32 over the flattened (1, B*T) form
        "max_seqlen": int(np.diff(cu).max()) if B else 0,
        "domain_ids": torch.from_numpy(sh.domains[seg].astype(np.int64)),  # (B, T)
    }


class PackedLoader:
    """Deterministic packed batches: `batch(step)` depends only on (seed, step, rank, world_size).

    Global batch = world_size * batch_size rows; rank r gets rows [r*B, (r+1)*B) of it.
    """

    def __init__(self, shard_dir: str | Path, split: str, batch_size: int, seq_len: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, continue_rows: bool = False,
                 tokenizer: str | Path | None = None, check_ids: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.shards = Shards(shard_dir, split, tokenizer=tokenizer, check_ids=check_ids)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.continue_rows = rank, world_size, continue_rows
        self.n_windows = (len(self.shards) - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"{self.shards.token_file}: {len(self.shards)} tokens is too few for seq_len={seq_len}")
        self._perms: dict[int, np.ndarray] = {}  # memo of a pure function; not iterator state

    # -- accounting ---------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def tokens_per_step(self) -> int:
        """Label tokens per optimizer step over all ranks."""
        return self.global_batch * self.seq_len

    @property
    def unique_tokens(self) -> int:
        """Label tokens in one epoch (the stream minus its ragged tail)."""
        return self.n_windows * self.seq_len

    def epochs(self, step: int) -> float:
        """Epochs consumed by steps 0 .. step-1 (1.0 = every unique token seen once)."""
        return step * self.global_batch / self.n_windows

    def epoch_of(self, step: int) -> int:
        """Epoch that the first row of `step` belongs to."""
        return (step * self.global_batch) // self.n_windows

    # -- batches ------------------------------------------------------------------------------
    def _perm(self, epoch: int) -> np.ndarray:
        p = self._perms.get(epoch)
        if p is None:
            p = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = p
        return p

    def windows(self, step: int) -> np.ndarray:
        """Window indices (B,) of this rank's rows at `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        g = step * self.global_batch + self.rank * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epoch, idx = np.divmod(g, self.n_windows)
        return np.array([self._perm(int(e))[i] for e, i in zip(epoch, idx)], dtype=np.int64)

    def batch(self, step: int) -> dict:
        return make_batch(self.shards, self.windows(step) * self.seq_len, self.seq_len,
                          continue_rows=self.continue_rows)

    def __iter__(self) -> Iterator[dict]:  # convenience: steps 0, 1, 2, ...
        step = 0
        while True:
            yield self.batch(step)
            step += 1


class ValidationSet:
    """A fixed list of windows of a split, the same on every call, split across ranks.

    `max_windows` spreads the windows evenly over the stream (the stream is ordered by source, so the
    first k windows would be one domain). With `domain`, only windows starting in that domain are
    used and labels of tokens from other domains are -100.
    """

    def __init__(self, shard_dir: str | Path, seq_len: int, batch_size: int, *, split: str = "val",
                 max_windows: int | None = None, domain: str | None = None, rank: int = 0, world_size: int = 1,
                 tokenizer: str | Path | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.shards = sh = Shards(shard_dir, split, tokenizer=tokenizer)
        self.seq_len, self.batch_size = seq_len, batch_size
        n = (len(sh) - 1) // seq_len
        w = np.arange(n, dtype=np.int64)
        self.domain_id = None
        if domain is not None:
            if domain not in sh.domain_names:
                raise ValueError(f"domain {domain!r} not in {sh.domain_names}")
            self.domain_id = sh.domain_names.index(domain)
            first_doc = np.searchsorted(sh.offsets[:-1], w * seq_len, side="right") - 1
            w = w[sh.domains[first_doc] == self.domain_id]
        if max_windows is not None and w.size > max_windows:
            w = w[np.unique(np.linspace(0, w.size - 1, max_windows).round().astype(np.int64))]
        w = w[: w.size - w.size % world_size] if world_size > 1 else w  # equal batch counts on every rank
        self.windows = w
        self.rank_windows = w[rank::world_size]

    def __len__(self) -> int:
        return -(-self.rank_windows.size // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        for s in range(0, self.rank_windows.size, self.batch_size):
            b = make_batch(self.shards, self.rank_windows[s:s + self.batch_size] * self.seq_len, self.seq_len)
            if self.domain_id is not None:
                b["labels"] = b["labels"].masked_fill(b["domain_ids"] != self.domain_id, -100)
            yield b


def domain_loss_sums(loss_BT: torch.Tensor, domain_ids: torch.Tensor, labels: torch.Tensor,
                     n_domains: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-domain (sum of token losses, token count), each (n_domains,), ignoring labels == -100.
    Sum over batches (and all-reduce over ranks), then divide, for per-domain validation loss."""
    valid = labels != -100
    d = domain_ids[valid]
    sums = torch.zeros(n_domains, dtype=torch.float64, device=loss_BT.device).index_add_(0, d, loss_BT[valid].double())
    counts = torch.bincount(d, minlength=n_domains).to(torch.float64)
    return sums, counts
