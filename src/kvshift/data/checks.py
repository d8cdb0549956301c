"""Checks on what users feed the data pipeline: text encodings of their files, shard sidecars.

Every failure is a UserError (a ValueError) whose message names the file and, for meta.json, the
field; `kvshift data ...` prints it as one line (exit status 2).
"""

from __future__ import annotations

import json
from pathlib import Path

from kvshift.errors import UserError
from kvshift.utils.io import file_sha256
from kvshift.utils.paths import plain_name

__all__ = ["decode_text", "check_shard_meta", "check_not_empty", "check_tokenizer_made_shards"]

SHARD_DTYPES = ("uint16", "uint32")


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 text of a user's file (or line); UserError for binary data or another encoding, which
    would otherwise become text full of replacement characters."""
    if b"\x00" in data:
        raise UserError(f"{where}: binary data (NUL bytes), not UTF-8 text; leave it out of --files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); convert it "
                        f"first, e.g. `iconv -f latin1 -t utf-8`") from None


def check_not_empty(records: list[dict], seen: dict[str, int], min_doc_chars: int) -> None:
    """UserError when a corpus build kept no training document (a tokenizer and shards made from it
    would only fail at `kvshift train`)."""
    if sum(r["splits"]["train"]["documents"] for r in records):
        return
    seen = ", ".join(f"{r['name']}: {seen.get(r['name'], 0):,} read, {r['dropped_short']:,} shorter than {min_doc_chars} "
                     f"characters, {r['dropped_duplicate_files']:,} duplicates, {r['splits']['val']['documents']:,} "
                     f"in val" for r in records)
    raise UserError(f"no training document kept ({seen}); the previous corpus, if any, is unchanged")


def _need(cond: bool, path: Path, field: str, want: str, got) -> None:
    if not cond:
        raise UserError(f"{path}: {field} must be {want}, got {got!r}")


def check_shard_meta(meta, path: Path, fmt: str) -> None:
    """UserError naming meta.json and the field unless `meta` is a well-formed shard sidecar whose
    shard file names are plain names inside the shard directory."""
    _need(isinstance(meta, dict), path, "the sidecar", "a JSON object", type(meta).__name__)
    _need(meta.get("format") == fmt, path, "format", repr(fmt), meta.get("format"))
    for k in ("vocab_size", "eos_id"):
        v = meta.get(k)
        _need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, path, k, "a non-negative integer", v)
    _need(meta["vocab_size"] > 0, path, "vocab_size", "positive", meta["vocab_size"])
    _need(meta["eos_id"] < meta["vocab_size"], path, "eos_id", f"< vocab_size {meta['vocab_size']}", meta["eos_id"])
    _need(meta.get("dtype") in SHARD_DTYPES, path, "dtype", " or ".join(SHARD_DTYPES), meta.get("dtype"))
    _need(isinstance(meta.get("tokenizer_sha256"), str), path, "tokenizer_sha256", "a string",
          meta.get("tokenizer_sha256"))
    doms = meta.get("domains")
    _need(isinstance(doms, list) and all(isinstance(d, str) for d in doms), path, "domains", "a list of names", doms)
    splits = meta.get("splits")
    _need(isinstance(splits, dict) and splits, path, "splits", "a table of splits", splits)
    for name, info in splits.items():
        f = f"splits.{name}"
        _need(isinstance(info, dict), path, f, "a table", info)
        for k in ("tokens", "documents"):
            v = info.get(k)
            _need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, path, f"{f}.{k}",
                  "a non-negative integer", v)
        files = info.get("files")
        _need(isinstance(files, dict) and {"tokens", "offsets", "domains"} <= set(files), path, f"{f}.files",
              "a table with tokens, offsets and domains", files)
        for k in ("tokens", "offsets", "domains"):
            plain_name(files[k], f"{path}: {f}.files.{k}")


def check_tokenizer_made_shards(tokenizer, shard_meta) -> None:
    """UserError when `tokenizer` (a tokenizer.json) is not the file the training shards were made
    with (their meta.json keeps its sha256). Skipped when the shards' meta.json is not found, for a
    saved transformers tokenizer (re-serialised, so its bytes differ) and for shards without one; a file of
    other bytes passes when the shards keep their tokenizer.json and the two encode alike (`same_encoding`)."""
    if tokenizer is None or shard_meta is None or not Path(shard_meta).is_file():
        return
    p = Path(tokenizer)
    if p.is_dir():
        if (p / "tokenizer_config.json").is_file():
            return
        p = p / "tokenizer.json"
    if not p.is_file():
        return
    try:
        want = json.loads(Path(shard_meta).read_text()).get("tokenizer_sha256")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(want, str) and want.strip("0") and file_sha256(p) != want:
        if encodes_like_shards(p, Path(shard_meta).parent, want):
            return  # the same tokenizer, serialised differently
        raise UserError(f"tokenizer {tokenizer} is not the one the training shards were made with ({shard_meta}: "
                        f"tokenizer_sha256 {want[:12]}…, this file {file_sha256(p)[:12]}…); pass that tokenizer.json")


# text two tokenizers are compared on: prose, code, digits, whitespace runs, unicode, special tokens
PROBE = ("The capital of France is Paris.\n\ndef f(x):\n    return x ** 2  # 12345 67.89\n\tTabs\r\n"
         "Ünïcödé — “quotes” 日本語 🙂 <|endoftext|><|im_start|>user\nhi<|im_end|>  trailing   ")


def encodes_like_shards(tokenizer: str | Path, shard_dir: str | Path, sha256: str) -> bool:
    """Whether `tokenizer` (a tokenizer.json whose bytes differ from the one the shards were made with) is that
    tokenizer all the same: the shards keep their own copy (kvshift.data.shards.TOKENIZER, sha256 as their
    meta.json says) and the two encode alike."""
    own = Path(shard_dir) / "tokenizer.json"
    return own.is_file() and file_sha256(own) == sha256 and same_encoding(own, tokenizer)


def same_encoding(a: str | Path, b: str | Path) -> bool:
    """Whether two tokenizer.json files are the same tokenizer in what matters: the same vocabulary and the
    same ids for PROBE, with and without special tokens. Bytes are no test: transformers versions serialise
    one tokenizer differently (5.17 and 5.24 do for SmolLM2's)."""
    from tokenizers import Tokenizer

    ta, tb = Tokenizer.from_file(str(a)), Tokenizer.from_file(str(b))
    if ta.get_vocab(with_added_tokens=True) != tb.get_vocab(with_added_tokens=True):
        return False
    return all(ta.encode(PROBE, add_special_tokens=x).ids == tb.encode(PROBE, add_special_tokens=x).ids
               for x in (True, False))
