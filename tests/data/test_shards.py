import json
import shutil

import numpy as np
import pytest

from kvshift.data.corpus import iter_documents
from kvshift.data.shards import META, Shards, pack_shards, subset_shards, token_dtype, unpack_shards, tokenize_corpus
from kvshift.data.tokenizer import EOS, EOS_ID, load_tokenizer, train_tokenizer
from kvshift.utils.io import file_sha256


def test_tokenizer_eos_id_and_roundtrip(pipeline):
    tok = load_tokenizer(pipeline.tokenizer)
    assert tok.get_vocab_size() == 512
    assert tok.token_to_id(EOS) == EOS_ID == 0
    s = "Déjà vu: naïve café — 漢字 🙂\n    return x  # code\n"
    assert tok.decode(tok.encode(s).ids) == s  # byte-level: exact round trip, no <unk>


def test_tokenizer_loads_in_transformers(pipeline):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(pipeline.tokenizer), eos_token=EOS, bos_token=EOS)
    ids = fast("hello world")["input_ids"]
    assert fast.decode(ids) == "hello world" and fast.eos_token_id == 0


@pytest.mark.parametrize("vocab,dtype", [(512, np.uint16), (65536, np.uint16), (65537, np.uint32), (200_000, np.uint32)],
                         ids=["512", "65536", "65537", "200k"])
def test_token_dtype(vocab, dtype):
    assert token_dtype(vocab) == dtype


def test_sidecar_and_layout(pipeline):
    meta = pipeline.meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 512 and meta["eos_id"] == 0
    assert meta["tokenizer_sha256"] == file_sha256(pipeline.tokenizer)
    tok = load_tokenizer(pipeline.tokenizer)
    for split in ("train", "val"):
        sh = Shards(pipeline.shards, split, tokenizer=pipeline.tokenizer)
        docs = list(iter_documents(pipeline.corpus, split))
        assert sh.n_documents == len(docs) == meta["splits"][split]["documents"]
        assert (pipeline.shards / f"{split}.tokens.bin").stat().st_size == 2 * len(sh)
        assert sh.tokens[-1] == 0 and np.all(sh.tokens[sh.offsets] == 0)
        assert sum(meta["splits"][split]["tokens_by_domain"].values()) == len(sh) - 1
        for i in (0, len(docs) // 2, len(docs) - 1):  # a document decodes back to its text, eos around it
            seg = np.asarray(sh.tokens[sh.offsets[i] + 1: sh.offsets[i + 1]]).tolist()
            assert EOS_ID not in seg
            assert tok.decode(seg) == docs[i]["text"]
            assert sh.domain_names[sh.domains[i]] == docs[i]["domain"]


def _copy(pipeline, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(pipeline.shards, dst)
    return dst


def test_truncated_shard_names_file(pipeline, tmp_path):
    d = _copy(pipeline, tmp_path)
    f = d / "train.tokens.bin"
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"train\.tokens\.bin: truncated or corrupt"):
        Shards(d, "train")
    Shards(d, "val")  # the other split is unaffected


def test_offsets_file_size_checked(pipeline, tmp_path):
    d = _copy(pipeline, tmp_path)
    (d / "val.offsets.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match=r"val\.offsets\.bin: truncated or corrupt"):
        Shards(d, "val")


def test_other_tokenizer_rejected(pipeline, tmp_path):
    other = tmp_path / "other.json"
    train_tokenizer(pipeline.corpus, 300, other)
    with pytest.raises(ValueError, match=r"train\.tokens\.bin: made with another tokenizer"):
        Shards(pipeline.shards, "train", tokenizer=other)


def test_id_out_of_vocab_rejected(pipeline, tmp_path):
    d = _copy(pipeline, tmp_path)
    toks = np.fromfile(d / "val.tokens.bin", dtype=np.uint16)
    toks[5] = 600
    toks.tofile(d / "val.tokens.bin")
    with pytest.raises(ValueError, match=r"val\.tokens\.bin: token id 600 at position 5 is >= vocab_size 512"):
        Shards(d, "val")


def test_offsets_out_of_sync_rejected(pipeline, tmp_path):
    d = _copy(pipeline, tmp_path)
    off = np.fromfile(d / "val.offsets.bin", dtype=np.int64)
    off[1] += 1
    off.tofile(d / "val.offsets.bin")
    with pytest.raises(ValueError, match=r"val\.offsets\.bin"):
        Shards(d, "val")


def test_missing_sidecar(tmp_path):
    with pytest.raises(ValueError, match="meta.json: missing shard sidecar"):
        Shards(tmp_path, "train")


def test_pack_unpack_roundtrip(pipeline, tmp_path):
    packed = tmp_path / "p.tar.xz"
    size = pack_shards(pipeline.shards, packed, preset=1)
    assert 0 < size < sum(p.stat().st_size for p in pipeline.shards.iterdir())
    meta = unpack_shards(packed, tmp_path / "out")
    assert meta["splits"] == pipeline.meta["splits"]
    for name in ("train.tokens.bin", "train.offsets.bin", "train.domains.bin", "val.tokens.bin"):
        assert (tmp_path / "out" / name).read_bytes() == (pipeline.shards / name).read_bytes(), name
    packed.write_bytes(packed.read_bytes()[: size // 2])
    with pytest.raises(ValueError, match=r"p\.tar\.xz: corrupt or truncated"):
        unpack_shards(packed, tmp_path / "out2")


def test_subset_keeps_whole_documents(pipeline, tmp_path):
    full = Shards(pipeline.shards, "train")
    budget = len(full) // 3
    meta = subset_shards(pipeline.shards, tmp_path / "sub", max_train_tokens=budget, seed=1)
    sub = Shards(tmp_path / "sub", "train")
    assert 0 < len(sub) <= budget and sub.n_documents < full.n_documents
    assert meta["splits"]["val"] == json.loads((pipeline.shards / META).read_text())["splits"]["val"]
    full_docs = {tuple(np.asarray(full.tokens[a:b]).tolist()) for a, b in zip(full.offsets[:-1], full.offsets[1:])}
    for a, b in zip(sub.offsets[:-1], sub.offsets[1:]):
        assert tuple(np.asarray(sub.tokens[a:b]).tolist()) in full_docs


def test_tokenize_domain_filter(pipeline, tmp_path):
    meta = tokenize_corpus(pipeline.corpus, pipeline.tokenizer, tmp_path / "s", domains=["code"], log=lambda s: None)
    assert set(meta["splits"]["train"]["tokens_by_domain"]) == {"code"}


def test_subset_of_validation_only_keeps_train_identical(pipeline, tmp_path):
    """--max-val-tokens alone: a smaller validation split, the training tokens byte for byte."""
    full_val = Shards(pipeline.shards, "val")
    budget = len(full_val) // 2
    meta = subset_shards(pipeline.shards, tmp_path / "sub", max_val_tokens=budget, seed=3)
    for name in ("train.tokens.bin", "train.offsets.bin", "train.domains.bin"):
        assert (tmp_path / "sub" / name).read_bytes() == (pipeline.shards / name).read_bytes(), name
    val = Shards(tmp_path / "sub", "val")
    assert 0 < len(val) <= budget and val.n_documents < full_val.n_documents
    assert "bytes" not in meta["splits"]["val"] and meta["subset_of"]["max_val_tokens"] == budget


def test_the_shards_tokenizer_travels_with_a_subset_and_a_pack(pipeline, tmp_path):
    """A tokenizer.json kept beside the shards (tokenize writes one for a GGUF) goes into a subset and a pack,
    so the machine that trains can compare it with a model's (kvshift.experiments.upcycle.check_match)."""
    import shutil

    src = tmp_path / "s"
    shutil.copytree(pipeline.shards, src)
    shutil.copyfile(pipeline.tokenizer, src / "tokenizer.json")
    subset_shards(src, tmp_path / "sub", max_train_tokens=len(Shards(src, "train")) // 2, seed=0)
    assert (tmp_path / "sub" / "tokenizer.json").read_bytes() == pipeline.tokenizer.read_bytes()
    pack_shards(tmp_path / "sub", tmp_path / "p.tar.xz", preset=1)
    unpack_shards(tmp_path / "p.tar.xz", tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == pipeline.tokenizer.read_bytes()
    (src / "tokenizer.json").write_text("{}")  # not the tokenizer meta.json names: left out of the pack
    pack_shards(src, tmp_path / "q.tar.xz", preset=1)
    unpack_shards(tmp_path / "q.tar.xz", tmp_path / "out2")
    assert not (tmp_path / "out2" / "tokenizer.json").exists()
