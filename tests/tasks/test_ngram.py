"""3-gram memory task (Fig. 3): fixed table, triple concatenation, x3-only scoring."""

import pytest
import torch

from kvshift.tasks import ngram
from kvshift.tasks.ngram import NGramTask


def test_table_is_fixed_random_and_functional():
    t = NGramTask(200, vocab_size=64, seed=7)
    assert t.table.shape == (200, 3)
    assert int(t.table.min()) >= t.reserved and int(t.table.max()) < 64
    assert len({(a, b) for a, b, _ in t.table.tolist()}) == 200  # distinct pairs -> x3 well defined
    assert torch.equal(t.table, NGramTask(200, vocab_size=64, seed=7).table)
    assert not torch.equal(t.table, NGramTask(200, vocab_size=64, seed=8).table)


@pytest.mark.parametrize("T", [3, 64, 100, 101], ids=lambda T: f"T{T}")
def test_sequences_are_table_triples_and_mask_marks_x3(T):
    task = NGramTask(200, vocab_size=64, seed=1)
    table = task.lookup()
    tokens, mask = task.sample(8, T, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (8, T) and mask.shape == (8, T) and mask.dtype == torch.bool
    assert not mask[:, -1].any()
    for row, m in zip(tokens.tolist(), mask.tolist()):
        for p in range(0, T - 2, 3):
            assert table[(row[p], row[p + 1])] == row[p + 2]
        expected = [p % 3 == 1 and p + 1 < T for p in range(T)]
        assert m == expected
        for p in range(T):
            if m[p]:
                assert table[(row[p - 1], row[p])] == row[p + 1]


def test_separator_layout():
    task = NGramTask(50, vocab_size=40, seed=2, separator=1)
    table = task.lookup()
    tokens, mask = task.sample(4, 41, generator=torch.Generator().manual_seed(0))
    for row, m in zip(tokens.tolist(), mask.tolist()):
        assert row[3::4] == [1] * len(row[3::4])
        for p in range(0, 41 - 3, 4):
            assert table[(row[p], row[p + 1])] == row[p + 2]
        assert m == [p % 4 == 1 and p + 1 < 41 for p in range(41)]


def test_deterministic_and_seed_dependent():
    task = NGramTask(200, vocab_size=64, seed=0)
    a = task.sample(4, 30, generator=torch.Generator().manual_seed(1))[0]
    b = task.sample(4, 30, generator=torch.Generator().manual_seed(1))[0]
    c = task.sample(4, 30, generator=torch.Generator().manual_seed(2))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_accuracy_counts_only_x3():
    task = NGramTask(20, vocab_size=30, seed=0)
    tokens, mask = task.sample(3, 30, generator=torch.Generator().manual_seed(0))
    oracle = torch.nn.functional.one_hot(torch.roll(tokens, -1, dims=1), 30).float()
    assert ngram.accuracy(oracle, tokens, mask) == (3 * 10, 3 * 10)  # p = 1, 4, ..., 28 per row
    wrong = torch.nn.functional.one_hot(tokens, 30).float()
    assert ngram.accuracy(wrong, tokens, mask)[0] == 0


@pytest.mark.parametrize("kw,name", [
    (dict(n_pairs=0), "n_pairs"), (dict(n_pairs=100, vocab_size=10), "n_pairs"),
    (dict(separator=9), "separator"), (dict(vocab_size=4), "vocab_size"),
])
def test_argument_validation(kw, name):
    with pytest.raises(ValueError, match=name):
        NGramTask(**kw)
    with pytest.raises(ValueError, match="seq_len"):
        NGramTask().sample(2, 2, generator=torch.Generator())
