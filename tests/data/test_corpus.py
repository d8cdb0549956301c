import hashlib
import json

import pytest

from kvshift.data.corpus import build_corpus, iter_documents, iter_user_files, split_of


def _docs(corpus, split):
    return list(iter_documents(corpus, split))


def test_manifest_fields_and_hashes(pipeline):
    man = pipeline.manifest
    assert [s["name"] for s in man["sources"]] == ["code-stdlib", "files"]
    for rec in man["sources"]:
        for key in ("name", "domain", "package", "version", "package_license", "license", "bytes", "words",
                    "documents", "splits"):
            assert key in rec, key
        assert rec["documents"] > 0 and rec["bytes"] > 0 and rec["words"] > 0
        for split in ("train", "val"):
            info = rec["splits"][split]
            path = pipeline.corpus / info["path"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"]
            assert sum(1 for _ in open(path)) == info["documents"]
    stdlib = man["sources"][0]
    assert stdlib["domain"] == "code" and stdlib["package_license"] == "PSF-2.0" and stdlib["version"].count(".") == 2
    assert man["totals"]["documents"] == sum(r["documents"] for r in man["sources"])
    assert set(man["by_domain"]) == {"code", "user"}


def test_split_is_by_whole_document_and_deterministic(pipeline):
    train, val = _docs(pipeline.corpus, "train"), _docs(pipeline.corpus, "val")
    assert len(val) > 0 and len(train) > len(val)
    ids_t, ids_v = {d["id"] for d in train}, {d["id"] for d in val}
    assert not ids_t & ids_v
    for d in train:
        assert split_of(d["id"], 0.2) == "train"
    for d in val:
        assert split_of(d["id"], 0.2) == "val"
    # every jsonl document is present exactly once, whole, in one split
    by_id = {d["id"]: d["text"] for d in train + val}
    for i, line in enumerate(open(pipeline.files["jsonl"])):
        text = json.loads(line)["text"]
        assert by_id[f"files/docs.jsonl:{i + 1}"] == text
    # the split is a pure function of the id
    assert split_of("files/x", 0.5) == split_of("files/x", 0.5)
    frac = sum(split_of(f"d{i}", 0.05) == "val" for i in range(20000)) / 20000
    assert 0.04 < frac < 0.06


def test_dedup_across_files(pipeline):
    texts = [d["text"] for d in _docs(pipeline.corpus, "train") + _docs(pipeline.corpus, "val")
             if d["id"] in ("files/a.txt", "files/b.txt")]
    assert len(texts) == 2
    assert sum(t.count(pipeline.shared) for t in texts) == 1  # long shared paragraph kept once
    assert all(t.endswith(pipeline.short) for t in texts)  # short repeat kept in both
    rec = pipeline.manifest["sources"][1]
    assert rec["dropped_paragraphs"] == 1


def test_code_domain_whole_files_dedup(tmp_path):
    (tmp_path / "u.txt").write_text("unique text " * 10)
    man = build_corpus(tmp_path / "c", sources=["code-stdlib"], files=[str(tmp_path / "u.txt")],
                       max_docs_per_source=5, cache=tmp_path, offline=True, log=lambda s: None)
    docs = _docs(tmp_path / "c", "train") + _docs(tmp_path / "c", "val")
    code = [d for d in docs if d["domain"] == "code"]
    assert len(code) == man["sources"][0]["documents"] > 0
    assert len({d["text"] for d in code}) == len(code)
    assert all("\t" not in d["text"] for d in code)


def test_domain_selection(tmp_path, pipeline):
    man = build_corpus(tmp_path / "c", sources=["code-stdlib"], exclude_domains=["code"],
                       files=[str(pipeline.files["jsonl"])], cache=tmp_path, offline=True, log=lambda s: None)
    assert [s["name"] for s in man["sources"]] == ["files"]
    with pytest.raises(ValueError, match="unknown domain"):
        build_corpus(tmp_path / "d", domains=["poetry"], cache=tmp_path, log=lambda s: None)
    with pytest.raises(ValueError, match="unknown source"):
        build_corpus(tmp_path / "d", sources=["nope"], cache=tmp_path, log=lambda s: None)


def test_user_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no string field 'text'"):
        list(iter_user_files([str(bad)]))
    with pytest.raises(ValueError, match="matches no file"):
        list(iter_user_files([str(tmp_path / "*.nothing")]))
    with pytest.raises(ValueError, match="is not a file"):
        list(iter_user_files([str(tmp_path / "missing.txt")]))


def test_parquet_documents(pipeline):
    if "parquet" not in pipeline.files:
        pytest.skip("pyarrow not installed")
    docs = _docs(pipeline.corpus, "train") + _docs(pipeline.corpus, "val")
    assert sum(d["id"].startswith("files/docs.parquet:") for d in docs) == 10


def test_offline_fetch_failure_is_recorded(tmp_path, pipeline):
    man = build_corpus(tmp_path / "c", sources=["wiki"], files=[str(pipeline.files["jsonl"])],
                       cache=tmp_path / "empty", offline=True, log=lambda s: None)
    assert "wiki" in man["failed"] and "--offline" in man["failed"]["wiki"]
    assert [s["name"] for s in man["sources"]] == ["files"]
