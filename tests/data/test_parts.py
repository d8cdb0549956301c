"""`kvshift data split` / `join`: a file carried in parts comes back bit for bit, or an error names the part."""

import json
import os

import pytest

from kvshift.cli import main
from kvshift.data.parts import join_file, split_file


@pytest.fixture
def blob(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(os.urandom(10_000) + b"tail")
    return p


def test_split_join_roundtrip(blob, tmp_path, capsys):
    assert main(["data", "split", str(blob), "--out", str(tmp_path / "parts"), "--part-mib", str(4096 / 2**20)]) == 0
    man = json.loads((tmp_path / "parts" / "model.gguf.parts.json").read_text())
    assert [p["bytes"] for p in man["parts"]] == [4096, 4096, 10_004 - 8192]
    out = tmp_path / "dev" / "model.gguf"
    assert main(["data", "join", str(tmp_path / "parts" / "model.gguf.parts.json"), "--out", str(out)]) == 0
    assert out.read_bytes() == blob.read_bytes()
    assert join_file(tmp_path / "parts" / "model.gguf.parts.json", out)["bytes"] == 10_004  # already there: kept


def test_exact_multiple_has_no_empty_part(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 8)
    man = split_file(p, tmp_path / "o", part_bytes=4)
    assert [q["bytes"] for q in man["parts"]] == [4, 4]
    join_file(tmp_path / "o" / "f.parts.json", tmp_path / "g")
    assert (tmp_path / "g").read_bytes() == b"x" * 8


def test_missing_or_damaged_part_is_named(blob, tmp_path):
    split_file(blob, tmp_path / "parts", part_bytes=4096)
    man = tmp_path / "parts" / "model.gguf.parts.json"
    part = tmp_path / "parts" / "model.gguf.part1"
    data = part.read_bytes()
    part.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match=r"model.gguf.part1: sha256"):
        join_file(man, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists() and not list(tmp_path.glob("*.joining"))
    part.unlink()
    with pytest.raises(ValueError, match="part missing"):
        join_file(man, tmp_path / "out.gguf")
    with pytest.raises(ValueError, match="no such parts manifest"):
        join_file(tmp_path / "none.parts.json", tmp_path / "out.gguf")
    with pytest.raises(ValueError, match="no such file"):
        split_file(tmp_path / "none", tmp_path / "o", part_bytes=10)
