"""Byte-level BPE tokenizer trained with the `tokenizers` library.

The saved tokenizer.json loads with `tokenizers.Tokenizer.from_file` and with
`transformers.PreTrainedTokenizerFast(tokenizer_file=...)`. The only special token is
`<|endoftext|>` at id 0; it separates (and serves as beginning of) documents in the shards.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from kvshift.data.corpus import iter_documents, read_manifest
from kvshift.errors import UserError
from kvshift.utils.staging import staged_output

__all__ = ["EOS", "EOS_ID", "train_tokenizer", "load_tokenizer"]

EOS = "<|endoftext|>"
EOS_ID = 0




def _sample_texts(corpus: Path, max_bytes: int | None, seed: int) -> Iterator[str]:
    """Train-split texts; above `max_bytes`, a seeded sample of documents spread over every source
    (each source contributes in proportion to its size)."""
    man = read_manifest(corpus)
    total = sum(r["splits"]["train"]["bytes"] for r in man["sources"])
    keep = 1.0 if not max_bytes or total <= max_bytes else max_bytes / total
    rng = random.Random(seed)
    for doc in iter_documents(corpus, "train"):
        if keep >= 1.0 or rng.random() < keep:
            yield doc["text"]


@staged_output("out", file=True)
def train_tokenizer(corpus: str | Path, vocab_size: int, out: str | Path, *, max_bytes: int | None = 300_000_000,
                    min_frequency: int = 2, seed: int = 0):
    """Trains a byte-level BPE on the corpus' train split and saves it to `out` (tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # optional: train extra

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be > 257 (256 bytes + {EOS}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],  # first special token -> id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_sample_texts(Path(corpus), max_bytes, seed), trainer=trainer)
    if tok.get_vocab_size() <= 257:  # the byte alphabet and <eos>: not one merge learned
        raise UserError(f"{corpus}: its train split is too small to learn a tokenizer: BPE learned no merge "
                        f"({tok.get_vocab_size()} tokens of the {vocab_size:,} asked, min_frequency {min_frequency}); "
                        f"build the corpus from more text")
    if tok.token_to_id(EOS) != EOS_ID:
        raise AssertionError(f"{EOS} got id {tok.token_to_id(EOS)}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return tok


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer  # optional dependency (the train extra)

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"tokenizer file {p} does not exist")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises its own Exception type on a malformed file
        raise ValueError(f"{p}: not a tokenizers tokenizer.json ({e})") from None


def eos_id_of(tok) -> int:
    """The document separator id of a tokenizer: <|endoftext|>, </s> or <eos> if present."""
    for t in (EOS, "</s>", "<eos>", "<|end_of_text|>"):
        i = tok.token_to_id(t)
        if i is not None:
            return i
    raise ValueError(f"tokenizer has none of {EOS}, </s>, <eos>, <|end_of_text|>; cannot separate documents")
