"""The textbook induction task: the segment repeats after a gap that varies per row, and the mask marks exactly
the positions an induction head can predict (checked against a brute-force reading of each row)."""

import pytest
import torch

from kvshift.tasks import repeat


def _reference_mask(row: list[int]) -> list[bool]:
    """p is a target when tokens[p] occurred earlier at q and tokens[p + 1] == tokens[q + 1]."""
    out = []
    for p in range(len(row)):
        earlier = [q for q in range(p) if row[q] == row[p]]
        out.append(p + 1 < len(row) and any(row[q + 1] == row[p + 1] for q in earlier))
    return out


@pytest.mark.parametrize("seq_len,segment", [(21, 6), (13, 6), (40, 3), (129, 48)])
def test_rows_repeat_one_segment_and_the_mask_is_the_brute_force_one(seq_len, segment):
    vocab = 4 + seq_len + 5
    tokens, mask = repeat.sample(64, seq_len, vocab, segment=segment, generator=torch.Generator().manual_seed(1))
    assert tokens.shape == mask.shape == (64, seq_len) and tokens.dtype == torch.int64 and mask.dtype == torch.bool
    assert tokens.min() >= repeat.RESERVED and tokens.max() < vocab
    gaps = set()
    for row, m in zip(tokens.tolist(), mask.tolist()):
        assert m == _reference_mask(row)
        assert len(set(row)) == seq_len - segment  # only the segment's second copy repeats anything
        start = next(p for p in range(1, seq_len) if row[p] == row[0])
        assert row[start:start + segment] == row[:segment] and sum(m) == segment - 1
        gaps.add(start - segment)
    assert len(gaps) > 1  # the gap varies per row


def test_deterministic_given_the_generator_and_bad_arguments_are_named():
    a = repeat.sample(4, 30, 100, segment=8, generator=torch.Generator().manual_seed(3))
    b = repeat.sample(4, 30, 100, segment=8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    g = torch.Generator()
    with pytest.raises(ValueError, match="seq_len"):
        repeat.sample(2, 10, 100, segment=6, generator=g)
    with pytest.raises(ValueError, match="vocab_size"):
        repeat.sample(2, 30, 20, segment=8, generator=g)
    with pytest.raises(ValueError, match="segment"):
        repeat.sample(2, 30, 100, segment=1, generator=g)
    with pytest.raises(ValueError, match="generator"):
        repeat.sample(2, 30, 100, segment=8, generator=None)
