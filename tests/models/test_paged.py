"""A paged-attention engine, simulated: rotated raw k / raw v stored in blocks of 16 tokens at shuffled
physical places of a shared pool with a block table per sequence, prefix blocks shared between two
sequences, rejected speculative tokens rolled back; the KV shift applied on read gives the logits of the
full forward. Also: a tile-by-tile read (each block plus the last W rows of the block before it, which
is what a paged kernel loads) equals the read over the gathered sequence."""

import pytest
import torch

from kvshift import LM, ModelConfig
from kvshift.layers.stateless import read_shifted, rotation_tables, slot_positions

BLOCK = 16
TOL = 1e-6


class Pool:
    """Physical blocks shared by every sequence, handed out in a shuffled order."""

    def __init__(self, cfg, n_blocks, seed=0):
        shape = (n_blocks, cfg.n_kv_heads, BLOCK, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=torch.float64) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=torch.float64) for _ in range(cfg.n_layers)]
        self.free = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.refs = [0] * n_blocks

    def take(self):
        b = self.free.pop()
        self.refs[b] = 1
        return b

    def release(self, b):
        self.refs[b] -= 1
        if self.refs[b] == 0:
            self.free.append(b)


class PagedSequence:
    """One sequence (batch 1) on the pool: the stateless cache interface kvshift.LM uses."""

    stateless = True
    padded = False

    def __init__(self, pool, cfg, prefix_of=None, n_shared_blocks=0):
        self.pool, self.cfg = pool, cfg
        self.table = []
        if prefix_of is not None:  # prefix caching: point at the other sequence's full blocks
            self.table = list(prefix_of.table[:n_shared_blocks])
            for b in self.table:
                pool.refs[b] += 1
        self.length = len(self.table) * BLOCK
        self.seen = torch.tensor([self.length])
        self.valid = torch.ones(1, self.length, dtype=torch.bool)

    def begin(self, n_new, token_valid):
        self.valid = torch.ones(1, self.length + n_new, dtype=torch.bool)
        self._new = n_new

    def end(self, token_valid):
        self.length += self._new
        self.seen = torch.tensor([self.length])

    def update(self, layer, c_new, v_new):
        T = c_new.shape[2]
        for t in range(T):
            s = self.length + t
            if s // BLOCK == len(self.table):
                self.table.append(self.pool.take())
            b = self.table[s // BLOCK]
            assert self.pool.refs[b] == 1, "writing into a shared block"
            self.pool.k[layer][b, :, s % BLOCK] = c_new[0, :, t]
            self.pool.v[layer][b, :, s % BLOCK] = v_new[0, :, t]
        S = self.length + T
        return self.gather(layer, S)

    def gather(self, layer, S):
        idx = torch.tensor(self.table)
        k = self.pool.k[layer][idx].permute(1, 0, 2, 3).reshape(1, self.cfg.n_kv_heads, -1, self.cfg.head_dim)
        v = self.pool.v[layer][idx].permute(1, 0, 2, 3).reshape(1, self.cfg.n_kv_heads, -1, self.cfg.head_dim)
        return k[:, :, :S], v[:, :, :S]

    def slot_positions(self):
        return slot_positions(self.valid)

    def rotation(self, width, device):
        return rotation_tables(width - 1, self.cfg.head_dim, self.cfg.rope_base, device=device)

    def crop(self, n):
        """Roll back to n tokens: blocks past the end go back to the pool."""
        keep = (n + BLOCK - 1) // BLOCK
        for b in self.table[keep:]:
            self.pool.release(b)
        self.table = self.table[:keep]
        self.length = n
        self.seen = torch.tensor([n])


def make(window, kind="kvshift"):
    cfg = ModelConfig.from_name("debug", attention=kind, shift_window=window, max_seq_len=256)
    lm = LM(cfg, seed=window).eval()
    with torch.no_grad():
        for name, p in lm.named_parameters():
            p.add_(torch.randn(p.shape) * 0.3) if "shift_" in name else p.mul_(3.0) if p.dim() == 2 else None
    return lm.double()


@pytest.mark.parametrize("window", [1, 2, 3])
def test_paged_prefix_sharing_and_speculative_rollback(window):
    lm = make(window)
    cfg = lm.config
    g = torch.Generator().manual_seed(window)
    pool = Pool(cfg, 16, seed=window)
    prefix = torch.randint(0, 97, (1, 2 * BLOCK), generator=g)  # two full blocks, shared
    tail_a = torch.randint(0, 97, (1, 7), generator=g)
    tail_b = torch.randint(0, 97, (1, 21), generator=g)
    with torch.no_grad():
        a = PagedSequence(pool, cfg)
        got_a = torch.cat([lm(prefix[:, :20], cache=a), lm(prefix[:, 20:], cache=a), lm(tail_a, cache=a)], 1)
        seq_a = torch.cat([prefix, tail_a], 1)
        assert (got_a - lm(seq_a)).abs().max().item() <= TOL
        # sequence B reuses A's two prefix blocks: its first token's shift reads the shared block's last rows
        b = PagedSequence(pool, cfg, prefix_of=a, n_shared_blocks=2)
        assert b.table == a.table[:2] and pool.refs[a.table[0]] == 2
        got_b = torch.cat([lm(tail_b[:, :9], cache=b), lm(tail_b[:, 9:], cache=b)], 1)
        seq_b = torch.cat([prefix, tail_b], 1)
        assert (got_b - lm(seq_b)[:, 2 * BLOCK:]).abs().max().item() <= TOL
        # speculative decoding on B: 6 draft tokens crossing a block boundary, 2 accepted, 4 rolled back
        n0 = b.length  # 53
        draft = torch.randint(0, 97, (1, 6), generator=g)
        verify = lm(draft, cache=b)
        assert (verify - lm(torch.cat([seq_b, draft], 1))[:, n0:]).abs().max().item() <= TOL
        b.crop(n0 + 2)
        assert len(b.table) == (n0 + 2 + BLOCK - 1) // BLOCK
        fix = torch.randint(0, 97, (1, 3), generator=g)
        got = lm(fix, cache=b)
        seq_b = torch.cat([seq_b, draft[:, :2], fix], 1)
        assert (got - lm(seq_b)[:, n0 + 2:]).abs().max().item() <= TOL
        # A continues undisturbed on the shared blocks
        more_a = torch.randint(0, 97, (1, 12), generator=g)
        got = lm(more_a, cache=a)
        assert (got - lm(torch.cat([seq_a, more_a], 1))[:, seq_a.shape[1]:]).abs().max().item() <= TOL
    # tile-by-tile: each block with the last W rows of the block before it gives the same K̂, V̂
    attn = lm.layers[1].attention
    ck, cv = attn._coefficients("k"), attn._coefficients("v")
    cos, sin = rotation_tables(window, cfg.head_dim, cfg.rope_base)
    S = b.length
    C, V = b.gather(1, S)
    want_k, want_v = read_shifted(C, V, ck, cv, b.slot_positions()[:, :S], cos, sin)
    tiles_k, tiles_v = [], []
    for i, blk in enumerate(b.table):
        rows = pool.k[1][blk:blk + 1], pool.v[1][blk:blk + 1]
        n = min(BLOCK, S - i * BLOCK)
        if i == 0:
            prev = [torch.zeros(1, cfg.n_kv_heads, window, cfg.head_dim, dtype=torch.float64)] * 2
        else:
            p = b.table[i - 1]
            prev = [pool.k[1][p:p + 1, :, BLOCK - window:], pool.v[1][p:p + 1, :, BLOCK - window:]]
        pos = torch.arange(i * BLOCK - window, i * BLOCK + BLOCK).view(1, -1)  # negative: before the start
        tk, tv = read_shifted(torch.cat([prev[0], rows[0]], 2), torch.cat([prev[1], rows[1]], 2), ck, cv,
                              pos.clamp(min=-1), cos, sin)
        tiles_k.append(tk[:, :, window:window + n])
        tiles_v.append(tv[:, :, window:window + n])
    torch.testing.assert_close(torch.cat(tiles_k, 2), want_k, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.cat(tiles_v, 2), want_v, atol=1e-12, rtol=0)
