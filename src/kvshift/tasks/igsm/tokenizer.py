"""iGSM problems as model input: the word-level tokenizer and training batches (see kvshift.tasks.igsm)."""

from __future__ import annotations

import random

import torch

from kvshift.tasks.common import check_int
from kvshift.tasks.igsm.generator import FAMILIES, TEMPLATE_WORDS, VARIABLES, generate, rng_from
from kvshift.tasks.igsm.problem import MOD

__all__ = ["IGSMTokenizer", "sample_batch"]


class IGSMTokenizer:
    """Word-level tokenizer with a fixed vocabulary (built deterministically from the word lists).

    Ids: 0 <pad>, 1 <bos>, 2 <sep> (between question and solution), 3 <eos>, then the sorted words.
    Texts are whitespace-separated words (the generator puts spaces around punctuation).
    """

    SPECIALS = ("<pad>", "<bos>", "<sep>", "<eos>")

    def __init__(self):
        words = set(TEMPLATE_WORDS) | set(VARIABLES) | {str(v) for v in range(MOD)}
        for fam in FAMILIES:
            for layer in fam:
                words |= set(layer)
        self.itos = list(self.SPECIALS) + sorted(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.sep_id, self.eos_id = range(4)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[w] for w in text.split()]
        except KeyError as e:
            raise ValueError(f"text contains a word outside the vocabulary: {e.args[0]!r}") from None

    def decode(self, ids) -> str:
        return " ".join(self.itos[int(i)] for i in ids if int(i) != self.pad_id)


def sample_batch(
    batch_size: int,
    max_operations: int,
    *,
    rng: random.Random | None = None,
    seed: int | None = None,
    exact: bool = False,
    tokenizer: IGSMTokenizer | None = None,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, T) int64 and loss_mask (B, T) bool for training.

    Row layout: <bos> question <sep> solution <eos>, right-padded with <pad> (0) to the longest row
    (or to ``seq_len``). loss_mask[b, p] is True when tokens[b, p + 1] is a solution token or <eos>
    (the same next-token convention as the other tasks).
    """
    batch_size = check_int("batch_size", batch_size, lo=1)
    r = rng_from(rng, seed)
    tok = tokenizer or IGSMTokenizer()
    rows, starts = [], []
    for _ in range(batch_size):
        p = generate(max_operations, rng=r, exact=exact)
        q = [tok.bos_id] + tok.encode(p.question_text) + [tok.sep_id]
        rows.append(q + tok.encode(p.solution_text) + [tok.eos_id])
        starts.append(len(q))
    T = max(len(x) for x in rows)
    if seq_len is not None:
        seq_len = check_int("seq_len", seq_len, lo=1)
        if T > seq_len:
            raise ValueError(f"seq_len={seq_len} is shorter than a generated row ({T} tokens)")
        T = seq_len
    tokens = torch.full((batch_size, T), tok.pad_id, dtype=torch.int64)
    mask = torch.zeros((batch_size, T), dtype=torch.bool)
    for b, (x, s) in enumerate(zip(rows, starts)):
        tokens[b, : len(x)] = torch.tensor(x, dtype=torch.int64)
        mask[b, s - 1 : len(x) - 1] = True  # predicting tokens s .. len(x)-1
    return tokens, mask
