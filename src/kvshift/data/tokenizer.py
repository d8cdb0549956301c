"""Byte-level BPE tokenizer trained with the `tokenizers` library.

`kvshift data tokenize --tokenizer` also takes a pretrained model's tokenizer (`resolve_tokenizer`): a
model directory holding tokenizer.json (`kvshift convert-llama` writes one) or a GGUF file, whose
tokenizer transformers rebuilds (the `gguf` extra; the tokenizer.json it writes is byte-identical to the
one convert-llama writes from the same file). SmolLM2's `<|endoftext|>` is id 0 as here.

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

__all__ = ["EOS", "EOS_ID", "train_tokenizer", "load_tokenizer", "resolve_tokenizer", "is_gguf"]

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


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(4) == b"GGUF"


def resolve_tokenizer(path: str | Path, workdir: str | Path) -> tuple[Path, dict | None]:
    """(tokenizer.json path, source record or None) of `path`: a tokenizer.json file as is; a model
    directory -> its tokenizer.json; a GGUF file -> its tokenizer, written to `workdir`/tokenizer.json
    (source record: the GGUF's name and sha256). ValueError naming the path otherwise."""
    p = Path(path)
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            raise ValueError(f"tokenizer {p}: a directory without tokenizer.json (give a tokenizer.json, a model "
                             f"directory such as `kvshift convert-llama` writes, or a GGUF file)")
        return p / "tokenizer.json", None
    if not p.is_file():
        raise ValueError(f"tokenizer file {p} does not exist")
    if not is_gguf(p):
        return p, None
    from kvshift.utils.io import file_sha256

    try:
        from transformers import AutoTokenizer  # optional: the hf + gguf extras
    except ImportError:
        raise ValueError(f"{p}: reading a GGUF's tokenizer needs transformers and gguf "
                         f"(pip install transformers gguf)") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except ImportError as e:
        raise ValueError(f"{p}: transformers needs another package to read GGUF files ({e}): pip install gguf") from None
    except Exception as e:  # transformers/gguf raise many types on a damaged file
        raise ValueError(f"{p}: could not read the GGUF's tokenizer ({type(e).__name__}: {e})") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{p}: the GGUF's tokenizer has no fast (tokenizers) form to tokenize with")
    out = Path(workdir) / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    backend.save(str(out))
    return out, {"kind": "gguf", "file": p.name, "sha256": file_sha256(p)}
