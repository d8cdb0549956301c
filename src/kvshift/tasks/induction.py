"""Induction-head data (paper App. D), with the rule the paper states.

Generation walks forward over each row. At every step a token ``x`` is drawn uniformly from the
allowed ids ``[reserved, vocab_size)`` (ids below ``reserved`` are a reserved band, 0 is the pad;
none of them ever appears), never equal to the token just emitted. Then

* if ``x`` occurred earlier in the row, emit ``x`` and then the token that followed the MOST RECENT
  earlier occurrence of ``x`` (read from the sequence itself) and mark the position of ``x``:
  ``mask[b, p] = True`` means ``tokens[b, p + 1]`` is an induction target;
* otherwise emit ``x`` alone.

Rows have exactly ``seq_len`` tokens: a repeat drawn at the last position is emitted without its
follower and not marked (it has no next token). Rows without any target are regenerated.

Deviation from the printed generator (deliberate). The paper's code keeps a follower map that is only
updated when a NEW token is emitted, so when the latest occurrence of ``x`` was followed by an induced
(repeated) token the emitted target is stale or the sentinel -1 (about 17% / 18% of targets), and a
row can overrun its length by one. We implement the rule the paper states instead: the target is
always the token that actually followed the most recent earlier occurrence, never a pad, reserved id
or sentinel, and lengths are exact.

Which positions are marked. The emitted follower has itself occurred before (at the earlier
occurrence's next position), but the token after it is a fresh draw, so follower positions are NOT
marked (unless the follower is itself the drawn repeat, which cannot happen). Every marked position
therefore obeys the most-recent-occurrence rule; the converse fails only where a fresh draw happens to
equal the follower's follower by chance. The mask can be recomputed from the tokens alone by
re-parsing the walk (tests do this against a pure-python reference). No two adjacent tokens are equal.
"""

from __future__ import annotations

import numpy as np
import torch

from kvshift.tasks.common import accuracy, check_generator, check_int

__all__ = ["sample", "accuracy", "DEFAULT_RESERVED"]

DEFAULT_RESERVED = 4  # ids 0..3: 0 = pad, the rest left for bos/eos/etc.; never drawn

_MAX_ROUNDS = 100


def _walk(draws: np.ndarray, seq_len: int, vocab_size: int, reserved: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised lock-step walk over rows. draws (R, T): column 0 in [0, n), others in [0, n - 1)."""
    R, T = draws.shape[0], seq_len
    tokens = np.zeros((R, T), dtype=np.int64)  # (R, T)
    mask = np.zeros((R, T), dtype=bool)
    last = np.full((R, vocab_size), -1, dtype=np.int64)  # last position of each id per row
    pos = np.zeros(R, dtype=np.int64)  # next write position per row
    prev = np.zeros(R, dtype=np.int64)  # last emitted token per row
    rows = np.arange(R)
    for s in range(T):  # each step advances every active row by >= 1, so T steps suffice
        active = pos < T
        if not active.any():
            break
        r, p = rows[active], pos[active]
        x = reserved + draws[r, s]
        if s > 0:
            x = x + (x >= prev[r])  # skip the previous token: uniform over the other n - 1 ids
        tokens[r, p] = x
        j = last[r, x]  # most recent earlier occurrence (-1 if none)
        last[r, x] = p
        rep = (j >= 0) & (p + 1 < T)
        rr, pp = r[rep], p[rep]
        f = tokens[rr, j[rep] + 1]  # j + 1 < p because x != prev, so already written
        tokens[rr, pp + 1] = f
        last[rr, f] = pp + 1
        mask[rr, pp] = True
        pos[r] = p + 1 + rep
        prev[r] = x
        prev[rr] = f
    assert (pos >= T).all()
    return tokens, mask


def sample(
    batch_size: int,
    seq_len: int = 512,
    vocab_size: int = 8000,
    *,
    generator: torch.Generator,
    reserved: int = DEFAULT_RESERVED,
    pool_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a batch of induction sequences.

    Returns tokens (B, T) int64 with ids in [reserved, vocab_size) and mask (B, T) bool where
    mask[b, p] marks that tokens[b, p + 1] is an induction target. Deterministic given the state of
    ``generator`` (which it advances).

    pool_size: if given, each row draws from its own random subset of ``pool_size`` ids of the
    vocabulary (the walk is the same; only the ids a row can use shrink). With the full range of
    8000 ids a 512-token row holds ~15 targets; a pool of 256 gives ~100, a denser training signal
    for scaled-down batches. None = the whole allowed range.
    """
    batch_size = check_int("batch_size", batch_size, lo=1)
    seq_len = check_int("seq_len", seq_len, lo=4)  # shortest row with a target: a b a b
    reserved = check_int("reserved", reserved, lo=1)  # 0 is the pad and is never drawn
    vocab_size = check_int("vocab_size", vocab_size, lo=reserved + 2)
    check_generator(generator)
    n_all = vocab_size - reserved
    if pool_size is not None:
        pool_size = check_int("pool_size", pool_size, lo=2, hi=n_all)
    n = n_all if pool_size is None else pool_size
    walk_vocab = reserved + n

    tokens = np.zeros((batch_size, seq_len), dtype=np.int64)
    mask = np.zeros((batch_size, seq_len), dtype=bool)
    todo = np.arange(batch_size)
    for _ in range(_MAX_ROUNDS):
        R = len(todo)
        first = torch.randint(0, n, (R, 1), generator=generator)
        rest = torch.randint(0, n - 1, (R, seq_len - 1), generator=generator)
        draws = torch.cat([first, rest], dim=1).numpy()
        t, m = _walk(draws, seq_len, walk_vocab, reserved)
        if pool_size is not None:  # map each row's pool indices to its own random subset of ids
            subset = torch.rand(R, n_all, generator=generator).argsort(dim=1)[:, :n].numpy() + reserved
            t = np.take_along_axis(subset, t - reserved, axis=1)
        tokens[todo], mask[todo] = t, m
        todo = todo[~m.any(axis=1)]
        if len(todo) == 0:
            return torch.from_numpy(tokens), torch.from_numpy(mask)
    raise ValueError(
        f"seq_len={seq_len} is too short for vocab_size={vocab_size}: rows almost never contain a repeat"
    )
