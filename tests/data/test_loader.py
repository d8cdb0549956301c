import numpy as np
import pytest
import torch

from kvshift.data.loader import PackedLoader, ValidationSet, domain_loss_sums, make_batch
from kvshift.data.shards import Shards

T = 37  # odd on purpose


def _loader(pipeline, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("seq_len", T)
    return PackedLoader(pipeline.shards, "train", seed=kw.pop("seed", 0), **kw)


def test_batch_shapes_and_labels(pipeline):
    b = _loader(pipeline).batch(0)
    assert b["input_ids"].shape == b["labels"].shape == b["position_ids"].shape == b["domain_ids"].shape == (4, T)
    assert b["input_ids"].dtype == b["labels"].dtype == b["position_ids"].dtype == torch.int64
    assert b["cu_seqlens"].dtype == torch.int32
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])


def test_deterministic_by_seed_and_step(pipeline):
    a, b, c = _loader(pipeline, seed=3), _loader(pipeline, seed=3), _loader(pipeline, seed=4)
    for step in (0, 5, 1000):
        for k in ("input_ids", "labels", "position_ids", "cu_seqlens"):
            assert torch.equal(a.batch(step)[k], b.batch(step)[k])
    assert not torch.equal(a.batch(0)["input_ids"], c.batch(0)["input_ids"])
    assert not torch.equal(a.batch(0)["input_ids"], a.batch(1)["input_ids"])


def test_resume_equals_uninterrupted(pipeline):
    it = iter(_loader(pipeline, seed=7))
    run = [next(it)["input_ids"] for _ in range(12)]
    resumed = _loader(pipeline, seed=7)  # fresh object, no state: start at step 8
    for step in range(8, 12):
        assert torch.equal(resumed.batch(step)["input_ids"], run[step])


def test_ranks_disjoint_and_equal_to_global_batch(pipeline):
    ws, B = 3, 2
    single = _loader(pipeline, batch_size=ws * B, seed=1)
    ranks = [_loader(pipeline, batch_size=B, seed=1, rank=r, world_size=ws) for r in range(ws)]
    for step in (0, 1, 9):
        wins = [r.windows(step) for r in ranks]
        flat = np.concatenate(wins)
        assert len(set(flat.tolist())) == ws * B
        assert np.array_equal(flat, single.windows(step))
        assert torch.equal(torch.cat([r.batch(step)["input_ids"] for r in ranks]), single.batch(step)["input_ids"])


def test_epoch_visits_every_window_once(pipeline):
    ld = _loader(pipeline, batch_size=1, seed=2)
    n = ld.n_windows
    seen = np.concatenate([ld.windows(s) for s in range(n)])
    assert np.array_equal(np.sort(seen), np.arange(n))
    assert ld.epochs(n) == pytest.approx(1.0) and ld.epoch_of(n) == 1 and ld.epoch_of(n - 1) == 0
    nxt = np.concatenate([ld.windows(s) for s in range(n, 2 * n)])
    assert np.array_equal(np.sort(nxt), np.arange(n)) and not np.array_equal(nxt, seen)
    assert ld.unique_tokens == n * T and ld.tokens_per_step == T


def _expected_positions(sh, start, continue_rows):
    starts = set(sh.offsets[:-1].tolist())
    pos, out = 0, []
    for t in range(T):
        p = start + t
        if p in starts:
            pos = 0
        elif t == 0:
            pos = 0 if not continue_rows else p - sh.offsets[np.searchsorted(sh.offsets[:-1], p, side="right") - 1]
        out.append(pos)
        pos += 1
    return out


def _check_rows(sh, b, starts, continue_rows):
    n_boundaries = 0
    for row, start in enumerate(starts):
        assert b["position_ids"][row].tolist() == _expected_positions(sh, int(start), continue_rows)
        # a document start is exactly an <eos> input at position 0
        zeros = (b["position_ids"][row] == 0).nonzero().flatten().tolist()
        eos_at = (b["input_ids"][row] == sh.eos_id).nonzero().flatten().tolist()
        assert [z for z in zeros if z > 0] == [e for e in eos_at if e > 0]
        n_boundaries += len([e for e in eos_at if e > 0])
    return n_boundaries


@pytest.mark.parametrize("continue_rows", [False, True], ids=["reset_rows", "continue_rows"])
def test_positions_reset_at_document_starts(pipeline, continue_rows):
    ld = _loader(pipeline, batch_size=8, continue_rows=continue_rows)
    sh = ld.shards
    for step in range(4):  # loader rows (mostly inside documents)
        _check_rows(sh, ld.batch(step), ld.windows(step) * T, continue_rows)
    # rows straddling document starts, including the first and the last document
    o = sh.offsets
    starts = np.array([0, o[1] - 3, o[2] - T + 1, o[len(o) // 2] - 10, o[-2] - 1, len(sh) - T - 1])
    b = make_batch(sh, starts, T, continue_rows=continue_rows)
    assert _check_rows(sh, b, starts, continue_rows) >= 4


def test_cu_seqlens_match_positions(pipeline):
    for cont in (False, True):
        b = _loader(pipeline, batch_size=5, continue_rows=cont).batch(3)
        cu = b["cu_seqlens"].tolist()
        flat = b["position_ids"].flatten()
        assert cu[0] == 0 and cu[-1] == 5 * T and all(x < y for x, y in zip(cu, cu[1:]))
        assert all(r * T in cu for r in range(5))  # rows never merge in the packed form
        for a, z in zip(cu, cu[1:]):  # inside a segment positions count up by one
            seg = flat[a:z]
            assert torch.equal(seg - seg[0], torch.arange(z - a))
            assert cont or seg[0] == 0
        assert b["max_seqlen"] == max(y - x for x, y in zip(cu, cu[1:]))


def test_domain_ids_follow_documents(pipeline):
    ld = _loader(pipeline, batch_size=16)
    sh = ld.shards
    b = ld.batch(0)
    for row, w in enumerate(ld.windows(0)):
        for t in (0, T // 2, T - 1):
            p = int(w) * T + t
            doc = np.searchsorted(sh.offsets[:-1], p, side="right") - 1
            assert b["domain_ids"][row, t] == sh.domains[doc]


def test_validation_set_fixed_and_per_domain(pipeline):
    a = ValidationSet(pipeline.shards, T, 4, max_windows=9)
    b = ValidationSet(pipeline.shards, T, 4, max_windows=9)
    ba, bb = list(a), list(b)
    assert len(ba) == len(a) == 3 and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(ba, bb))
    r0 = ValidationSet(pipeline.shards, T, 4, rank=0, world_size=2)
    r1 = ValidationSet(pipeline.shards, T, 4, rank=1, world_size=2)
    assert not set(r0.rank_windows.tolist()) & set(r1.rank_windows.tolist())
    assert len(r0.rank_windows) == len(r1.rank_windows)
    user = Shards(pipeline.shards, "val").domain_names.index("user")
    v = ValidationSet(pipeline.shards, T, 4, domain="user")
    assert len(v.windows) > 0
    for batch in v:
        keep = batch["labels"] != -100
        assert keep.any() and torch.all(batch["domain_ids"][keep] == user)
    with pytest.raises(ValueError, match="domain 'poetry'"):
        ValidationSet(pipeline.shards, T, 4, domain="poetry")


def test_domain_loss_sums():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    dom = torch.tensor([[0, 0, 2], [2, 2, 0]])
    labels = torch.tensor([[1, 1, 1], [1, -100, 1]])
    s, c = domain_loss_sums(loss, dom, labels, 3)
    assert s.tolist() == [9.0, 0.0, 7.0] and c.tolist() == [3.0, 0.0, 2.0]


def test_argument_errors(pipeline):
    with pytest.raises(ValueError, match="rank"):
        _loader(pipeline, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seq_len"):
        _loader(pipeline, seq_len=0)
    with pytest.raises(ValueError, match="too few"):
        PackedLoader(pipeline.shards, "val", 1, 10**9)
