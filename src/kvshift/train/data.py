"""What the trainer reads: any object with `batch(step) -> dict` (a `BatchSource`), plus a validation set.

The real source is `kvshift.data.PackedLoader` over token shards; `SyntheticSource` is a tiny
in-memory stand-in with the same contract (deterministic in (seed, step), stateless, sharded across
ranks without overlap, document boundaries in position_ids) for tests and smoke runs.

Gradient accumulation does not change the data order: micro-step m of rank r reads the loader built
with (rank = m * world + r, world_size = grad_accum * world), so the global batch of a step is the
same rows whether it is split over ranks, micro-steps or neither.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, Protocol

import numpy as np
import torch

from kvshift.data.loader import PackedLoader, ValidationSet

__all__ = ["BatchSource", "SyntheticSource", "SyntheticValidation", "Validation", "make_sources", "make_validation"]


class BatchSource(Protocol):
    def batch(self, step: int) -> dict:
        """input_ids (B, T) int64, labels (B, T) int64, position_ids (B, T); optional domain_ids (B, T)."""
        ...


SYNTHETIC_DOMAINS = ["pattern", "noise"]


@functools.lru_cache(maxsize=8)
def zipf_cdf(vocab_size: int) -> np.ndarray:
    """CDF of a Zipf law over ids 1 .. vocab_size-1 (0 is <eos>): sample with searchsorted(cdf, u) + 1."""
    p = 1.0 / np.arange(1, vocab_size)
    cdf = np.cumsum(p / p.sum())
    cdf[-1] = 1.0
    return cdf


def _synthetic_row(vocab_size: int, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One row of T+1 tokens: documents `eos, body` (eos = 0); bodies are a short pattern repeated
    (learnable: an induction/copy task) or, one in four, i.i.d. noise; tokens follow a Zipf law
    (learnable: unigram statistics, so the loss falls within a few steps). Returns tokens and the
    domain id of each token."""
    cdf = zipf_cdf(vocab_size)
    toks, doms = [], []
    n = 0
    while n < seq_len + 1:
        length = int(rng.integers(8, max(9, seq_len)))
        noise = rng.random() < 0.25
        if noise:
            body = 1 + np.searchsorted(cdf, rng.random(length), side="right")
        else:
            pat = 1 + np.searchsorted(cdf, rng.random(int(rng.integers(2, 9))), side="right")
            body = np.resize(pat, length)
        doc = np.concatenate([[0], body])
        toks.append(doc)
        doms.append(np.full(doc.size, int(noise)))
        n += doc.size
    return np.concatenate(toks)[: seq_len + 1], np.concatenate(doms)[: seq_len + 1]


def _rows_to_batch(rows: np.ndarray, doms: np.ndarray) -> dict:
    B, T1 = rows.shape
    T = T1 - 1
    inp = rows[:, :T]
    # position inside the document: index since the last eos (every row starts with an eos)
    starts = inp == 0
    idx = np.where(starts, np.arange(T)[None, :], 0)
    last = np.maximum.accumulate(idx, axis=1)
    position = np.arange(T)[None, :] - last
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(inp, dtype=np.int64)),  # (B, T)
        "labels": torch.from_numpy(np.ascontiguousarray(rows[:, 1:], dtype=np.int64)),  # (B, T)
        "position_ids": torch.from_numpy(position.astype(np.int64)),  # (B, T)
        "domain_ids": torch.from_numpy(np.ascontiguousarray(doms[:, :T], dtype=np.int64)),  # (B, T)
    }


class SyntheticSource:
    """Deterministic synthetic batches: global row g of step s is drawn from rng(seed, g) with
    g = s * world * B + rank * B + b, so ranks never overlap and the global batch does not depend on
    how it is split."""

    domain_names = SYNTHETIC_DOMAINS

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if vocab_size < 3:
            raise ValueError(f"vocab_size must be >= 3, got {vocab_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.world_size * self.seq_len

    def epochs(self, step: int) -> float:
        return 0.0  # an endless stream

    def rows(self, global_rows: Iterable[int], stream: int = 0) -> dict:
        out = [_synthetic_row(self.vocab_size, self.seq_len, np.random.default_rng([self.seed, stream, int(g)]))
               for g in global_rows]
        return _rows_to_batch(np.stack([o[0] for o in out]), np.stack([o[1] for o in out]))

    def batch(self, step: int) -> dict:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        g0 = step * self.world_size * self.batch_size + self.rank * self.batch_size
        return self.rows(range(g0, g0 + self.batch_size))


class Validation:
    """A fixed set of validation batches for this rank, with what is needed to report the loss:
    `domain_names` (None: no per-domain loss) and `bytes_per_token` (None: no bits/byte) overall and
    per domain."""

    def __init__(self, batches: Iterable[dict], n_batches: int, domain_names: list[str] | None,
                 bytes_per_token: float | None = None, bytes_per_token_by_domain: dict[str, float] | None = None):
        self._batches, self.n_batches = batches, n_batches
        self.domain_names = domain_names
        self.bytes_per_token = bytes_per_token
        self.bytes_per_token_by_domain = bytes_per_token_by_domain or {}

    def __iter__(self):
        return iter(self._batches)

    def __len__(self) -> int:
        return self.n_batches


class SyntheticValidation:
    def __init__(self, src: SyntheticSource, n_windows: int):
        w = np.arange(n_windows - n_windows % src.world_size if src.world_size > 1 else n_windows)
        self.rows = w[src.rank::src.world_size]
        self.src = src

    def __iter__(self):
        B = self.src.batch_size
        for s in range(0, self.rows.size, B):
            yield self.src.rows(self.rows[s:s + B], stream=1)

    def __len__(self):
        return math.ceil(self.rows.size / self.src.batch_size)


def make_sources(data, vocab_size: int, rank: int, world_size: int) -> list:
    """One source per micro-step (see the module docstring). `data` is a DataConfig."""
    ga = data.grad_accum
    if data.kind == "synthetic":
        return [SyntheticSource(vocab_size, data.seq_len, data.batch_size, seed=data.seed,
                                rank=m * world_size + rank, world_size=ga * world_size) for m in range(ga)]

    out = [PackedLoader(data.shard_dir, "train", data.batch_size, data.seq_len, seed=data.seed,
                        rank=m * world_size + rank, world_size=ga * world_size, tokenizer=data.tokenizer,
                        check_ids=(m == 0)) for m in range(ga)]
    if out[0].shards.vocab_size > vocab_size:
        raise ValueError(f"{data.shard_dir}: shards have vocab_size {out[0].shards.vocab_size} > model "
                         f"vocab_size {vocab_size}; set model.vocab_size")
    return out


def make_validation(data, vocab_size: int, n_windows: int, rank: int, world_size: int) -> Validation:
    if data.kind == "synthetic":
        src = SyntheticSource(vocab_size, data.seq_len, data.batch_size, seed=data.seed, rank=rank,
                              world_size=world_size)
        v = SyntheticValidation(src, n_windows)
        return Validation(v, len(v), SYNTHETIC_DOMAINS if data.per_domain else None)

    vs = ValidationSet(data.shard_dir, data.seq_len, data.batch_size, split=data.val_split, max_windows=n_windows,
                       rank=rank, world_size=world_size, tokenizer=data.tokenizer)
    if len(vs) == 0:  # the validation loss would read 0.0
        raise ValueError(f"{vs.shards.token_file}: the {data.val_split!r} split has {len(vs.shards):,} tokens, too few "
                         f"for one window of data.seq_len + 1 = {data.seq_len + 1}")
    info = vs.shards.meta["splits"][data.val_split]
    bpt = info["bytes"] / info["tokens"] if info.get("bytes") else None
    by_dom = {}
    for d, nb in (info.get("bytes_by_domain") or {}).items():
        nt = (info.get("tokens_by_domain") or {}).get(d)
        if nt:
            by_dom[d] = nb / nt
    names = vs.shards.domain_names if data.per_domain else None
    return Validation(vs, len(vs), names, bpt, by_dom)
