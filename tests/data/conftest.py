"""A tiny offline corpus built once per session: users' files (txt, jsonl, parquet when pyarrow is
installed) plus the first files of the local Python standard library as the code domain."""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvshift.data.corpus import build_corpus
from kvshift.data.shards import tokenize_corpus
from kvshift.data.tokenizer import train_tokenizer

SHARED = ("This paragraph is shared by two user files. It is long enough to count as boilerplate for the "
          "paragraph de-duplication, which only looks at paragraphs of a hundred characters or more.")
SHORT = "Exit."  # short repeated paragraph: must survive de-duplication


def _prose(i: int) -> str:
    """A unique pseudo-text per i (no paragraph repeats, so de-duplication leaves it intact)."""
    rng = random.Random(i)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "quiet", "market",
             "window", "garden", "silver", "thunder", "paper", "orange", "winter", "signal", "harbor", "maple"]
    sents = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 14))).capitalize() + "."
             for _ in range(rng.randint(15, 40))]
    return f"Document {i}\n\n" + " ".join(sents[:10]) + "\n\n" + " ".join(sents[10:])


@dataclass
class Pipeline:
    root: Path
    files: dict
    corpus: Path
    manifest: dict
    tokenizer: Path
    shards: Path
    meta: dict
    shared: str = SHARED
    short: str = SHORT


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Pipeline:
    root = tmp_path_factory.mktemp("data")
    src = root / "src"
    src.mkdir()
    files = {}
    a = src / "a.txt"
    a.write_text(_prose(1) + "\n\n" + SHARED + "\n\n" + SHORT + "\n")
    b = src / "b.txt"
    b.write_text(_prose(2) + "\n\n" + SHARED + "\n\n" + SHORT + "\n")
    files["txt"] = [a, b]
    jl = src / "docs.jsonl"
    with open(jl, "w") as f:
        for i in range(3, 60):
            f.write(json.dumps({"text": _prose(i), "meta": i}) + "\n")
    files["jsonl"] = jl
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq_path = src / "docs.parquet"
        pq.write_table(pa.table({"text": [_prose(i) for i in range(100, 110)]}), pq_path)
        files["parquet"] = pq_path
    except ImportError:
        pass
    patterns = [str(a), str(src / "b.*"), str(jl)] + ([str(files["parquet"])] if "parquet" in files else [])
    corpus = root / "corpus"
    man = build_corpus(corpus, sources=["code-stdlib"], cache=root / "cache", files=patterns,
                       files_domain="user", val_fraction=0.2, max_docs_per_source=40, offline=True,
                       log=lambda s: None)
    tok = root / "tokenizer.json"
    train_tokenizer(corpus, 512, tok)
    shards = root / "shards"
    meta = tokenize_corpus(corpus, tok, shards, log=lambda s: None)
    return Pipeline(root, files, corpus, man, tok, shards, meta)
