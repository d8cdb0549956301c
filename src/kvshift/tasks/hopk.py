"""hop-k task of Sanford, Hsu & Telgarsky (2024), "Transformers, parallel computation, and
logarithmic depth" (paper App. H).

Definition (0-indexed). For a sequence x_0 .. x_{N-1} over a small alphabet:

    find(i)   = 1 + max{ j < i : x_j = x_i }        (undefined when x_i has no earlier occurrence)
    find^0(i) = i,   find^k(i) = find(find^{k-1}(i))  (undefined once any step is undefined)
    hop_k(i)  = x_{find^k(i)}                        (UNDEFINED when find^k(i) is)

so hop_1(i) is the token right after the most recent earlier occurrence of x_i (an induction head)
and hop_k chains that lookup k times, following positions. hop_0(i) = x_i (copy the token itself).
Each hop_k(i) depends only on x_0..x_i, so the task is a causal sequence-to-sequence labelling.

Sample layout (B, T): position 0 holds the hop-count token for k, positions 1..T-1 hold x_0..x_{T-2}
drawn i.i.d. uniformly from the alphabet, or with ``no_adjacent_repeats`` as in Sanford, Hsu &
Telgarsky's generator: x_0 uniform, each next x_i uniform over the alphabet minus x_{i-1}, so no
character equals the one before it and find(i) != i. ``targets[b, 1 + i] = hop_k(i)`` (an alphabet id or
UNDEFINED); ``targets[b, 0] = IGNORE_INDEX`` (-100, the cross-entropy default), since the model's
output at the hop-count token is not scored. Unlike the other tasks here, the target at position p
is read from the output AT p (not p + 1).

Vocabulary (``HopKVocab``): alphabet ids 0..A-1, hop-count ids A + k for k = 0..max_hops, then
UNDEFINED = A + max_hops + 1; vocab_size = A + max_hops + 2.

Defaults (alphabet 4, seq_len 256) keep hop_16 defined at ~81% of positions (undefined positions
cluster at the start, where the chain runs out of earlier occurrences).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvshift.tasks.common import check_generator, check_int

__all__ = ["HopKVocab", "IGNORE_INDEX", "sample", "hop_k", "hop_k_bruteforce", "error_rate"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class HopKVocab:
    alphabet_size: int
    max_hops: int

    def hop_id(self, k: int) -> int:
        return self.alphabet_size + k

    @property
    def undefined_id(self) -> int:
        return self.alphabet_size + self.max_hops + 1

    @property
    def vocab_size(self) -> int:
        return self.alphabet_size + self.max_hops + 2


def hop_k_bruteforce(seq, k: int) -> list:
    """Pure-python reference: [hop_k(i) for i] with None where undefined."""
    seq = [int(v) for v in seq]
    out = []
    for i in range(len(seq)):
        pos = i
        for _ in range(k):
            j = next((j for j in range(pos - 1, -1, -1) if seq[j] == seq[pos]), None)
            if j is None:
                pos = None
                break
            pos = j + 1
        out.append(None if pos is None else seq[pos])
    return out


def hop_k(x: torch.Tensor, k: torch.Tensor, alphabet_size: int, undefined: int) -> torch.Tensor:
    """Vectorised hop_k over rows. x (B, N) alphabet ids, k (B,) hop counts -> (B, N) ids or ``undefined``."""
    B, N = x.shape
    ar = torch.arange(N).expand(B, N)
    prev = torch.full((B, N), -1, dtype=torch.int64)  # most recent earlier occurrence of x_i
    for a in range(alphabet_size):
        hit = x == a
        last = torch.where(hit, ar, -1).cummax(dim=1).values  # last occurrence at or before i
        before = torch.cat([torch.full((B, 1), -1, dtype=torch.int64), last[:, :-1]], dim=1)
        prev = torch.where(hit, before, prev)
    find = torch.where(prev >= 0, prev + 1, -1)  # (B, N)
    pos = ar.clone()
    max_k = int(k.max()) if k.numel() else 0
    for s in range(1, max_k + 1):
        nxt = torch.gather(find, 1, pos.clamp(min=0))
        nxt = torch.where(pos < 0, -1, nxt)
        pos = torch.where((s <= k).unsqueeze(1), nxt, pos)
    val = torch.gather(x, 1, pos.clamp(min=0))
    return torch.where(pos >= 0, val, undefined)


def sample(
    batch_size: int,
    seq_len: int = 256,
    *,
    alphabet_size: int = 4,
    max_hops: int = 16,
    generator: torch.Generator,
    hops: int | None = None,
    no_adjacent_repeats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns tokens (B, T), targets (B, T) int64 and hops (B,).

    k is drawn uniformly from 0..max_hops per row unless ``hops`` fixes it (for error-vs-k curves).
    no_adjacent_repeats: draw each character uniformly from the alphabet minus the previous one (the
    first one uniformly) instead of i.i.d.; False (the default) keeps the i.i.d. draws, and with them
    every earlier sample, unchanged.
    """
    batch_size = check_int("batch_size", batch_size, lo=1)
    seq_len = check_int("seq_len", seq_len, lo=2)
    alphabet_size = check_int("alphabet_size", alphabet_size, lo=2)
    max_hops = check_int("max_hops", max_hops, lo=0)
    check_generator(generator)
    if not isinstance(no_adjacent_repeats, bool):
        raise ValueError(f"no_adjacent_repeats must be a bool, got {type(no_adjacent_repeats).__name__}")
    vocab = HopKVocab(alphabet_size, max_hops)
    if hops is None:
        k = torch.randint(0, max_hops + 1, (batch_size,), generator=generator)
    else:
        k = torch.full((batch_size,), check_int("hops", hops, lo=0, hi=max_hops), dtype=torch.int64)
    if no_adjacent_repeats:
        x = _no_adjacent_repeats(batch_size, seq_len - 1, alphabet_size, generator)
    else:
        x = torch.randint(0, alphabet_size, (batch_size, seq_len - 1), generator=generator)  # (B, N)
    y = hop_k(x, k, alphabet_size, vocab.undefined_id)
    tokens = torch.cat([(alphabet_size + k).unsqueeze(1), x], dim=1)
    targets = torch.cat([torch.full((batch_size, 1), IGNORE_INDEX, dtype=torch.int64), y], dim=1)
    return tokens, targets, k


def _no_adjacent_repeats(batch_size: int, n: int, alphabet_size: int, generator: torch.Generator) -> torch.Tensor:
    """(B, n) characters: x_0 uniform, x_i = (x_{i-1} + d_i) mod A with d_i uniform on 1..A-1, i.e. uniform
    over the alphabet minus x_{i-1}."""
    first = torch.randint(0, alphabet_size, (batch_size, 1), generator=generator)
    steps = torch.randint(1, alphabet_size, (batch_size, n - 1), generator=generator)
    return (first + torch.cat([torch.zeros_like(first), steps], dim=1).cumsum(dim=1)) % alphabet_size


def error_rate(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(wrong, total) over scored positions (targets != IGNORE_INDEX), reading logits AT each position."""
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    m = targets != IGNORE_INDEX
    wrong = int(((logits.argmax(-1) != targets) & m).sum())
    return wrong, int(m.sum())
