"""The textbook induction task: a random segment, a random gap, the same segment again.

Each row of ``seq_len`` tokens is ``a, f1, a, f2``: a segment ``a`` of ``segment`` tokens, a filler ``f1`` of
``g`` tokens with ``g`` drawn uniformly from ``[0, seq_len - 2 * segment]`` per row, the segment again, and a
filler ``f2`` for the rest. All tokens of a row are distinct ids from ``[reserved, vocab_size)`` except the
repeated segment (a random permutation of the ids supplies them), so in the second copy every token after
the first is determined by one earlier occurrence: an induction head predicts it, nothing else in the row
does. Because the gap varies per row, no fixed relative position finds the earlier copy: a model that only
attends by position cannot solve it, which a fixed gap would allow (a one-layer model learns the fixed
offset).

``mask[b, p]`` marks that ``tokens[b, p + 1]`` is an induction target: p runs over the second copy's
positions except its last one (the token after it is filler).

This is the task of the induction-head literature (random tokens repeated), not the paper's generator
(`kvshift.tasks.induction`, where single tokens recur with their followers); the `induction-control`
experiment uses it as a setting in which a vanilla two-layer model does form induction heads within a
small budget, so the speed of KV shifting can be measured against it.
"""

from __future__ import annotations

import torch

from kvshift.tasks.common import check_generator, check_int

__all__ = ["sample"]

RESERVED = 4  # ids 0..3 are never drawn, as in `kvshift.tasks.induction`


def sample(batch_size: int, seq_len: int, vocab_size: int, *, segment: int, generator: torch.Generator,
           reserved: int = RESERVED) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, seq_len) int64 and mask (B, seq_len) bool; deterministic given ``generator``."""
    batch_size = check_int("batch_size", batch_size, lo=1)
    segment = check_int("segment", segment, lo=2)
    seq_len = check_int("seq_len", seq_len, lo=2 * segment)
    reserved = check_int("reserved", reserved, lo=1)
    distinct = seq_len - segment  # ids a row needs: the segment once, the fillers
    vocab_size = check_int("vocab_size", vocab_size, lo=reserved + distinct)
    check_generator(generator)
    ids = torch.rand(batch_size, vocab_size - reserved, generator=generator).argsort(dim=1)[:, :distinct] + reserved
    gap = torch.randint(0, seq_len - 2 * segment + 1, (batch_size, 1), generator=generator)
    pos = torch.arange(seq_len).expand(batch_size, seq_len)
    second = pos - segment - gap  # index into the segment for the second copy, valid in [0, segment)
    in_second = (second >= 0) & (second < segment)
    # source column in `ids`: the segment is ids[:, :segment]; fillers take the remaining ids in order
    filler = torch.where(pos < segment, pos, torch.where(pos < segment + gap, pos, pos - segment))
    src = torch.where(in_second, second, filler)
    tokens = ids.gather(1, src)
    mask = in_second & (second < segment - 1)
    return tokens, mask
