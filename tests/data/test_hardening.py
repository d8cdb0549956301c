"""Hostile inputs to `kvshift data ...` (the hardening issue): one line naming the file and field, exit
status 2, and a failed command never replaces or deletes the user's previous output."""

import json
import shutil

import numpy as np
import pytest

from kvshift.cli import main
from kvshift.data.shards import Shards
from kvshift.errors import UserError
from kvshift.train.testing import write_tiny_shards


def _snapshot(root):
    """Bytes of every file under root (and of root itself when a file), by relative path."""
    if root.is_file():
        return {".": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _err(capsys, verb: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith(f"kvshift data {verb}: error: "), err
    return err


def _no_leftovers(parent):
    left = [p.name for p in parent.iterdir() if ".staging-" in p.name or ".replaced-" in p.name]
    assert not left, left


def _prose(i: int) -> str:
    return f"Document {i}. " + " ".join(f"word{(i * 7 + k) % 23} and thing{k % 5}" for k in range(40)) + "."


@pytest.fixture
def small(tmp_path):
    """A corpus, a tokenizer, shards and a pack built through the CLI from one user file."""
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": _prose(i)}) + "\n" for i in range(30)))
    c, tok, sh, pk = tmp_path / "corpus", tmp_path / "tok.json", tmp_path / "shards", tmp_path / "p.tar.xz"
    assert main(["data", "build-corpus", "--no-sources", "--files", str(src), "--out", str(c),
                 "--val-fraction", "0.2"]) == 0
    assert main(["data", "train-tokenizer", "--corpus", str(c), "--vocab-size", "300", "--out", str(tok)]) == 0
    assert main(["data", "tokenize", "--corpus", str(c), "--tokenizer", str(tok), "--out", str(sh)]) == 0
    assert main(["data", "pack", "--shards", str(sh), "--out", str(pk), "--preset", "0"]) == 0
    return src, c, tok, sh, pk


# ---- 3. build-corpus validates (and writes aside) before it replaces anything ------------------------
def test_build_corpus_typo_keeps_the_previous_corpus(small, tmp_path, capsys):
    src, c, *_ = small
    capsys.readouterr()
    before = _snapshot(c)
    assert main(["data", "build-corpus", "--no-sources", "--files", str(src), str(tmp_path / "dcos.jsonl"),
                 "--out", str(c)]) == 2
    assert "dcos.jsonl" in _err(capsys, "build-corpus")
    assert _snapshot(c) == before  # train/val files and manifest untouched
    _no_leftovers(tmp_path)


def test_build_corpus_failing_midway_keeps_the_previous_corpus(small, tmp_path, capsys):
    src, c, *_ = small
    bad = tmp_path / "zz.txt"
    bad.write_bytes("Caf\xe9 au lait, cr\xe8me br\xfbl\xe9e. ".encode("latin-1") * 10)
    capsys.readouterr()
    before = _snapshot(c)
    assert main(["data", "build-corpus", "--no-sources", "--files", str(src), str(bad), "--out", str(c)]) == 2
    assert _snapshot(c) == before
    _no_leftovers(tmp_path)


def test_a_rebuild_replaces_the_whole_corpus(small, tmp_path):
    """A successful build still drops files of sources no longer built, and keeps unrelated files."""
    src, c, *_ = small
    (c / "train" / "old-source.jsonl").write_text("{}\n")
    (c / "NOTES.md").write_text("mine")
    other = tmp_path / "other.txt"
    other.write_text(_prose(99) * 3)
    assert main(["data", "build-corpus", "--no-sources", "--files", str(other), "--out", str(c),
                 "--val-fraction", "0"]) == 0
    assert sorted(p.name for p in (c / "train").iterdir()) == ["files.jsonl"]
    assert (c / "NOTES.md").read_text() == "mine"
    assert json.loads((c / "manifest.json").read_text())["totals"]["documents"] == 1
    _no_leftovers(tmp_path)


# ---- 5, 6. text that is not UTF-8: refused, naming the file ------------------------------------------
@pytest.mark.parametrize("name,data,named", [
    ("latin1.txt", "Caf\xe9 cr\xe8me br\xfbl\xe9e, d\xe9j\xe0 vu. ".encode("latin-1") * 5, "not UTF-8 text (byte 0xe9"),
    ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4, "binary data"),
    ("bad.jsonl", b'{"text": "fine line, long enough to be kept by the builder"}\n{"text": "caf\xe9"}\n',
     "bad.jsonl:2: not UTF-8 text"),
], ids=["latin1", "binary", "jsonl-line"])
def test_non_utf8_files_are_refused(tmp_path, capsys, name, data, named):
    f = tmp_path / name
    f.write_bytes(data)
    out = tmp_path / "corpus"
    assert main(["data", "build-corpus", "--no-sources", "--files", str(f), "--out", str(out)]) == 2
    err = _err(capsys, "build-corpus")
    assert named in err and str(f) in err, err
    assert not (out / "manifest.json").exists()


# ---- 6. a corpus with nothing to train on fails at the step that makes it -----------------------------
def test_all_documents_too_short(tmp_path, capsys):
    f = tmp_path / "short.jsonl"
    f.write_text("".join(json.dumps({"text": f"tiny {i}"}) + "\n" for i in range(50)))
    out = tmp_path / "corpus"
    assert main(["data", "build-corpus", "--no-sources", "--files", str(f), "--out", str(out)]) == 2
    err = _err(capsys, "build-corpus")
    assert "no training document kept" in err and "50 read, 50 shorter than 32 characters" in err
    assert not (out / "manifest.json").exists()
    _no_leftovers(tmp_path)


def _empty_corpus(root):
    """A corpus directory (as an older build-corpus left it) whose train split has no document."""
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    (root / "train" / "files.jsonl").write_text("")
    (root / "val" / "files.jsonl").write_text(json.dumps({"id": "files/a", "domain": "user", "text": "x" * 40}) + "\n")
    (root / "manifest.json").write_text(json.dumps({
        "format": "kvshift-corpus-v1", "val_fraction": 0.5, "totals": {"documents": 1, "bytes": 40, "words": 1},
        "sources": [{"name": "files", "domain": "user", "splits": {"train": {"bytes": 0}, "val": {"bytes": 40}}}]}))
    return root


def test_train_tokenizer_that_learns_nothing_is_refused(tmp_path, capsys):
    c = _empty_corpus(tmp_path / "corpus")
    tok = tmp_path / "tok.json"
    tok.write_text("previous tokenizer")
    assert main(["data", "train-tokenizer", "--corpus", str(c), "--vocab-size", "300", "--out", str(tok)]) == 2
    assert "learned no merge (257 tokens of the 300 asked" in _err(capsys, "train-tokenizer")
    assert tok.read_text() == "previous tokenizer"
    _no_leftovers(tmp_path)


def test_train_tokenizer_says_when_it_learned_fewer_tokens(small, tmp_path, capsys):
    _, c, *_ = small
    capsys.readouterr()
    assert main(["data", "train-tokenizer", "--corpus", str(c), "--vocab-size", "5000", "--out",
                 str(tmp_path / "t2.json")]) == 0
    assert "of 5,000 asked: the corpus has too little text" in capsys.readouterr().out


def test_tokenize_without_training_documents_is_refused(small, tmp_path, capsys):
    _, _, tok, sh, _ = small
    c = _empty_corpus(tmp_path / "empty")
    capsys.readouterr()
    before = _snapshot(sh)
    assert main(["data", "tokenize", "--corpus", str(c), "--tokenizer", str(tok), "--out", str(sh)]) == 2
    assert "no training document" in _err(capsys, "tokenize")
    assert _snapshot(sh) == before
    _no_leftovers(tmp_path)


# ---- staged writes: tokenize, pack and unpack keep the previous output when they fail -----------------
def test_tokenize_failing_midway_keeps_the_previous_shards(small, tmp_path, capsys):
    _, c, tok, sh, _ = small
    (c / "val" / "files.jsonl").unlink()  # the train split tokenizes, then the val split fails
    capsys.readouterr()
    before = _snapshot(sh)
    assert main(["data", "tokenize", "--corpus", str(c), "--tokenizer", str(tok), "--out", str(sh)]) == 2
    assert "listed in the manifest but missing" in _err(capsys, "tokenize")
    assert _snapshot(sh) == before
    _no_leftovers(tmp_path)


def test_pack_of_broken_shards_keeps_the_previous_pack(small, tmp_path, capsys):
    _, _, _, sh, pk = small
    broken = tmp_path / "broken"
    shutil.copytree(sh, broken)
    with open(broken / "val.tokens.bin", "r+b") as f:
        f.truncate(10)
    before = _snapshot(pk)
    capsys.readouterr()
    assert main(["data", "pack", "--shards", str(broken), "--out", str(pk), "--preset", "0"]) == 2
    assert "val.tokens.bin: truncated or corrupt shard" in _err(capsys, "pack")
    assert _snapshot(pk) == before
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "member-missing"])
def test_unpack_of_a_corrupt_pack_keeps_the_previous_shards(small, tmp_path, capsys, damage):
    import tarfile

    _, _, _, sh, pk = small
    bad = tmp_path / "bad.tar.xz"
    if damage == "truncated":
        bad.write_bytes(pk.read_bytes()[: pk.stat().st_size // 2])
    else:  # other shards whose val files are missing: the train files are extracted before that shows
        other = write_tiny_shards(tmp_path / "other")
        with tarfile.open(bad, "w:xz") as tar:
            for name in ("meta.json", "train.tokens.bin", "train.offsets.bin", "train.domains.bin"):
                tar.add(other / name, arcname=name)
    before = _snapshot(sh)
    capsys.readouterr()
    assert main(["data", "unpack", str(bad), "--out", str(sh)]) == 2
    assert ("corrupt or truncated pack" if damage == "truncated" else "missing or unsafe") in _err(capsys, "unpack")
    assert _snapshot(sh) == before
    _no_leftovers(tmp_path)


# ---- 5, 7. shard sidecars: every field checked, file names stay inside the directory -------------------
@pytest.mark.parametrize("edit,named", [
    (lambda m: m.update(dtype="banana"), "dtype must be uint16 or uint32, got 'banana'"),
    (lambda m: m.pop("splits"), "splits must be a table of splits, got None"),
    (lambda m: m["splits"]["train"].pop("documents"), "splits.train.documents must be a non-negative integer"),
    (lambda m: m["splits"]["train"]["files"].update(tokens="../../etc/passwd"), "splits.train.files.tokens"),
    (lambda m: m["splits"]["train"]["files"].update(offsets="/etc/passwd"), "splits.train.files.offsets"),
    (lambda m: m.update(vocab_size="97"), "vocab_size must be a non-negative integer"),
], ids=["dtype", "no-splits", "no-documents", "dotdot", "absolute", "vocab-string"])
def test_bad_sidecar_names_file_and_field(tmp_path, capsys, edit, named):
    d = write_tiny_shards(tmp_path / "shards")
    meta = json.loads((d / "meta.json").read_text())
    edit(meta)
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as e:
        Shards(d, "train")
    assert named in str(e.value) and str(d / "meta.json") in str(e.value)
    assert main(["data", "pack", "--shards", str(d), "--out", str(tmp_path / "p.tar.xz")]) == 2
    assert named in _err(capsys, "pack")
    assert not (tmp_path / "p.tar.xz").exists()


def test_train_refuses_a_bad_sidecar_in_one_line(tmp_path, capsys):
    d = write_tiny_shards(tmp_path / "shards")
    meta = json.loads((d / "meta.json").read_text())
    meta["dtype"] = "banana"
    (d / "meta.json").write_text(json.dumps(meta))
    assert main(["train", "debug", "--out", str(tmp_path / "run"), "--set", "data.kind=shards",
                 "--set", f"data.shard_dir={d}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "meta.json: dtype must be uint16 or uint32, got 'banana'" in err
    assert not (tmp_path / "run").exists()


def test_a_validation_split_too_short_for_one_window_is_refused(tmp_path):
    """The validation loss of no window read 0.0."""
    from kvshift.train.config import load_config
    from kvshift.train.trainer import train

    d = write_tiny_shards(tmp_path / "shards", val_docs=0)
    with pytest.raises(ValueError, match=r"val.tokens.bin: the 'val' split has 1 tokens, too few for one window"):
        train(load_config("debug", ["data.kind=shards", f"data.shard_dir={d}", "train.steps=2"]), tmp_path / "run",
              log=lambda s: None)
    assert np.fromfile(d / "val.tokens.bin", dtype=np.uint16).size == 1
