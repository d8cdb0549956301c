"""3-gram memory task (paper Fig. 3).

A fixed table of ``n_pairs`` distinct random pairs ``(x1, x2)``, each with a random ``x3``, is drawn
once from ``seed``. Sequences concatenate triples ``x1 x2 x3`` drawn uniformly (with replacement)
from the table, starting at position 0, truncated to exactly ``seq_len``. The model must predict
``x3`` after ``x1 x2``: ``mask[b, p]`` is True when ``tokens[b, p + 1]`` is an ``x3`` (so the scored
positions are the ``x2`` positions), and accuracy is measured on ``x3`` only.

Layout choice (the paper does not print one): by default triples are NOT separated, so the period-3
phase is fixed by position 0 (a model can track it); ``separator=<id>`` inserts that id after every
triple (period 4) for a format where boundaries are explicit. Token ids are drawn from
``[reserved, vocab_size)``; ids below ``reserved`` (0 = pad) never occur except a chosen separator,
which must itself lie in the reserved band.
"""

from __future__ import annotations

import torch

from kvshift.tasks.common import accuracy, check_generator, check_int

__all__ = ["NGramTask", "accuracy"]


class NGramTask:
    """A fixed random 3-gram table and a sampler of sequences built from it."""

    def __init__(
        self,
        n_pairs: int = 200,
        vocab_size: int = 512,
        seed: int = 0,
        *,
        reserved: int = 4,
        separator: int | None = None,
    ):
        self.n_pairs = check_int("n_pairs", n_pairs, lo=1)
        self.reserved = check_int("reserved", reserved, lo=1)
        self.vocab_size = check_int("vocab_size", vocab_size, lo=self.reserved + 1)
        self.seed = check_int("seed", seed)
        n = self.vocab_size - self.reserved
        if n * n < self.n_pairs:
            raise ValueError(f"n_pairs={n_pairs} exceeds the {n * n} distinct pairs of {n} usable ids")
        if separator is not None:
            separator = check_int("separator", separator, lo=1, hi=self.reserved - 1)
        self.separator = separator
        self.period = 3 if separator is None else 4

        g = torch.Generator().manual_seed(self.seed)
        codes = torch.randperm(n * n, generator=g)[: self.n_pairs]  # distinct pairs, so x3 is a function
        x1 = self.reserved + codes // n
        x2 = self.reserved + codes % n
        x3 = self.reserved + torch.randint(0, n, (self.n_pairs,), generator=g)
        self.table = torch.stack([x1, x2, x3], dim=1)  # (n_pairs, 3) int64

    def lookup(self) -> dict[tuple[int, int], int]:
        """The table as {(x1, x2): x3}."""
        return {(int(a), int(b)): int(c) for a, b, c in self.table.tolist()}

    def sample(self, batch_size: int, seq_len: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T) int64 and mask (B, T) bool (mask[b, p]: tokens[b, p + 1] is an x3)."""
        batch_size = check_int("batch_size", batch_size, lo=1)
        seq_len = check_int("seq_len", seq_len, lo=3)
        check_generator(generator)
        P = self.period
        n_units = -(-seq_len // P)
        idx = torch.randint(0, self.n_pairs, (batch_size, n_units), generator=generator)
        units = self.table[idx]  # (B, U, 3)
        if self.separator is not None:
            sep = torch.full((batch_size, n_units, 1), self.separator, dtype=torch.int64)
            units = torch.cat([units, sep], dim=2)  # (B, U, 4)
        tokens = units.reshape(batch_size, n_units * P)[:, :seq_len].contiguous()
        pos = torch.arange(seq_len)
        is_x2 = (pos % P == 1) & (pos + 1 < seq_len)  # next token is the x3 of the same unit
        mask = is_x2.unsqueeze(0).expand(batch_size, seq_len).clone()
        return tokens, mask
