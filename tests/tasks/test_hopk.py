"""hop-k (Sanford, Hsu & Telgarsky 2024) labels against a pure-python brute force."""

import pytest
import torch

from kvshift.tasks import hopk
from kvshift.tasks.hopk import HopKVocab


def plain_find(x, i):
    """find(i) = 1 + max{j < i : x_j = x_i}, None without an earlier occurrence."""
    earlier = [j for j in range(i) if x[j] == x[i]]
    return earlier[-1] + 1 if earlier else None


def plain_hop_k(x, k):
    """hop_k(i) = x[find^k(i)], None where any step of the chain is undefined."""
    out = []
    for i in range(len(x)):
        p = i
        for _ in range(k):
            p = plain_find(x, p)
            if p is None:
                break
        out.append(None if p is None else x[p])
    return out


def test_bruteforce_by_hand():
    #        0  1  2  3  4  5  6
    seq = [0, 1, 0, 2, 0, 1, 2]
    assert hopk.hop_k_bruteforce(seq, 0) == seq
    # hop_1: after the most recent earlier occurrence of x_i
    assert hopk.hop_k_bruteforce(seq, 1) == [None, None, 1, None, 2, 0, 0]
    # hop_2(4): find(4)=3 (x_3=2 has no earlier 2) -> None; hop_2(5): find(5)=2, find(2)=1 -> x_1=1
    # hop_2(6): find(6)=4, find(4)=3 -> x_3 = 2
    assert hopk.hop_k_bruteforce(seq, 2) == [None, None, None, None, None, 1, 2]


@pytest.mark.parametrize("A,N", [(2, 33), (4, 128), (8, 200)], ids=["A2", "A4", "A8"])
def test_vectorised_matches_bruteforce(A, N):
    g = torch.Generator().manual_seed(A)
    B = 24
    x = torch.randint(0, A, (B, N), generator=g)
    k = torch.arange(B) % 17  # 0..16
    undef = A + 17
    y = hopk.hop_k(x, k, A, undef)
    for b in range(B):
        ref = hopk.hop_k_bruteforce(x[b].tolist(), int(k[b]))
        assert y[b].tolist() == [undef if r is None else r for r in ref]


@pytest.mark.parametrize("no_adjacent_repeats", [False, True], ids=["iid", "no-repeats"])
def test_sample_layout_against_bruteforce(no_adjacent_repeats):
    A, H = 4, 16
    voc = HopKVocab(A, H)
    tokens, targets, hops = hopk.sample(32, 97, alphabet_size=A, max_hops=H, no_adjacent_repeats=no_adjacent_repeats,
                                        generator=torch.Generator().manual_seed(0))
    assert tokens.shape == targets.shape == (32, 97) and hops.shape == (32,)
    assert torch.equal(tokens[:, 0], A + hops)
    assert int(tokens[:, 1:].max()) < A and int(tokens[:, 1:].min()) >= 0
    assert (targets[:, 0] == hopk.IGNORE_INDEX).all()
    assert len(set(hops.tolist())) > 5  # k is drawn per row
    for b in range(32):
        ref = plain_hop_k(tokens[b, 1:].tolist(), int(hops[b]))
        assert targets[b, 1:].tolist() == [voc.undefined_id if r is None else r for r in ref]
    assert voc.vocab_size == A + H + 2 and voc.hop_id(H) == voc.undefined_id - 1


@pytest.mark.parametrize("A", [2, 3, 4, 8])
def test_no_adjacent_repeats(A):
    tokens, _, _ = hopk.sample(400, 129, alphabet_size=A, no_adjacent_repeats=True,
                               generator=torch.Generator().manual_seed(A))
    x = tokens[:, 1:]
    assert int(x.min()) >= 0 and int(x.max()) < A
    assert not (x[:, 1:] == x[:, :-1]).any()
    for b in range(8):  # so the nearest earlier occurrence is never the token just before: find(i) != i
        row = x[b].tolist()
        assert all(plain_find(row, i) != i for i in range(len(row)))
    # the first character uniform; each next one uniform over the other A - 1
    first = torch.bincount(x[:, 0], minlength=A).float()
    assert (first / first.sum() - 1 / A).abs().max() < 0.08
    pairs = torch.zeros(A, A)
    pairs.index_put_((x[:, :-1].flatten(), x[:, 1:].flatten()), torch.ones(x[:, 1:].numel()), accumulate=True)
    cond = pairs / pairs.sum(1, keepdim=True)
    off = ~torch.eye(A, dtype=torch.bool)
    assert (cond[off] - 1 / (A - 1)).abs().max() < 0.03
    # the i.i.d. draw (the default) does repeat
    iid, _, _ = hopk.sample(400, 129, alphabet_size=A, generator=torch.Generator().manual_seed(A))
    assert (iid[:, 2:] == iid[:, 1:-1]).any()


def test_default_draws_unchanged():
    """The default is the i.i.d. generator: k, then the characters, drawn from the generator as before."""
    a = hopk.sample(6, 40, max_hops=5, generator=torch.Generator().manual_seed(9))
    b = hopk.sample(6, 40, max_hops=5, no_adjacent_repeats=False, generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    g = torch.Generator().manual_seed(9)
    k = torch.randint(0, 6, (6,), generator=g)
    x = torch.randint(0, 4, (6, 39), generator=g)
    assert torch.equal(a[2], k) and torch.equal(a[0][:, 1:], x)


def test_defaults_mostly_defined_at_k16():
    tokens, targets, _ = hopk.sample(256, generator=torch.Generator().manual_seed(0), hops=16)
    frac = float((targets[:, 1:] != HopKVocab(4, 16).undefined_id).float().mean())
    assert 0.7 < frac < 0.95  # ~0.81 measured for alphabet 4, T 256


def test_deterministic_and_seed_dependent():
    a = hopk.sample(4, 64, generator=torch.Generator().manual_seed(1))
    b = hopk.sample(4, 64, generator=torch.Generator().manual_seed(1))
    c = hopk.sample(4, 64, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_error_rate_helper():
    tokens, targets, _ = hopk.sample(4, 64, generator=torch.Generator().manual_seed(3))
    V = HopKVocab(4, 16).vocab_size
    oracle = torch.nn.functional.one_hot(targets.clamp(min=0), V).float()
    assert hopk.error_rate(oracle, targets) == (0, 4 * 63)
    wrong, total = hopk.error_rate(torch.nn.functional.one_hot(tokens, V).float(), targets)
    assert 0 < wrong < total


@pytest.mark.parametrize("kw,name", [
    (dict(alphabet_size=1), "alphabet_size"), (dict(max_hops=-1), "max_hops"),
    (dict(hops=17), "hops"), (dict(seq_len=1), "seq_len"), (dict(batch_size=0), "batch_size"),
    (dict(no_adjacent_repeats="yes"), "no_adjacent_repeats"), (dict(no_adjacent_repeats=1), "no_adjacent_repeats"),
])
def test_argument_validation(kw, name):
    args = dict(batch_size=2, seq_len=16, generator=torch.Generator())
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        hopk.sample(**args)
