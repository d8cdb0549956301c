"""Flat memmap token shards: writing (tokenize a corpus), validated reading, subsetting and packing.

Per split, in SHARD_DIR:

    <split>.tokens.bin    uint16 (vocab <= 65,536) or uint32 token ids, the whole split as one stream
    <split>.offsets.bin   int64 (D + 1,): offsets[i] = index of the <eos> that opens document i;
                          offsets[D] = N - 1 (the closing <eos>)
    <split>.domains.bin   uint8 (D,): domain id of each document (names in meta.json "domains")
    meta.json             tokenizer sha256, vocab size, eos id, dtype, token/document counts

The stream is `eos d0 eos d1 ... eos d{D-1} eos`: every document is followed by <eos>, and the
<eos> in front of a document is its first position (a beginning-of-document token), so a model that
resets its attention/shift at document starts sees <eos> at position 0 of every document.

Reading needs numpy only (the GPU side has no `tokenizers`); the tokenizer is only needed to write,
or to check that shards were made with a given tokenizer.
"""

from __future__ import annotations

import io
import json
import lzma
import os
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kvshift.data.checks import check_shard_meta
from kvshift.data.corpus import SPLITS, iter_documents, read_manifest
from kvshift.data.sources import DOMAINS
from kvshift.data.tokenizer import eos_id_of, is_gguf, load_tokenizer, resolve_tokenizer
from kvshift.utils.io import file_sha256
from kvshift.utils.staging import staged_output

__all__ = ["META", "tokenize_corpus", "Shards", "token_dtype", "subset_shards", "pack_shards", "unpack_shards"]

META = "meta.json"
TOKENIZER = "tokenizer.json"  # a copy of the tokenizer the shards were made with, kept beside them
FORMAT = "kvshift-shards-v1"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65,536), else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _files(split: str) -> dict[str, str]:
    return {"tokens": f"{split}.tokens.bin", "offsets": f"{split}.offsets.bin", "domains": f"{split}.domains.bin"}


# ---------------------------------------------------------------------------------------------
# writing


@staged_output("out", marker=META, clear=("*.tokens.bin", "*.offsets.bin", "*.domains.bin", "tokenizer.json"))
def tokenize_corpus(corpus: str | Path, tokenizer: str | Path, out: str | Path, *, batch_docs: int = 1024,
                    batch_chars: int = 16_000_000, domains: list[str] | None = None,
                    log: Callable[[str], None] = print) -> dict:
    """Tokenizes both splits of a built corpus into `out`; returns (and writes) the meta.json dict.
    `tokenizer`: a tokenizer.json, a model directory holding one, or a GGUF file (its tokenizer is
    written into `out` as tokenizer.json; kvshift.data.tokenizer.resolve_tokenizer)."""
    out = Path(out)
    tokenizer, tok_source = resolve_tokenizer(tokenizer, out)
    tok = load_tokenizer(tokenizer)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    eos = eos_id_of(tok)
    dtype = token_dtype(vocab)
    man = read_manifest(corpus)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    meta = {
        "format": FORMAT,
        "tokenizer_sha256": file_sha256(tokenizer),
        "tokenizer_file": Path(tokenizer).name,
        **({"tokenizer_source": tok_source} if tok_source else {}),
        "vocab_size": vocab,
        "eos_id": eos,
        "dtype": dtype.name,
        "domains": list(DOMAINS),
        "layout": "eos d0 eos d1 ... eos d{D-1} eos; offsets[i] = index of the eos opening document i; offsets[D] = N-1",
        "corpus_manifest": {"val_fraction": man["val_fraction"], "totals": man["totals"]},
        "splits": {},
    }
    for split in SPLITS:
        t0 = time.time()
        names = _files(split)
        n_tok, offsets, doms = 0, [], []
        by_dom_tok: dict[str, int] = {}
        by_dom_doc: dict[str, int] = {}
        by_src_tok: dict[str, int] = {}
        eos_arr = np.array([eos], dtype=dtype)
        with open(out / names["tokens"], "wb") as f:

            def flush(batch):
                nonlocal n_tok
                encs = encode([d["text"] for d in batch], add_special_tokens=False)
                for d, e in zip(batch, encs):
                    ids = np.asarray(e.ids, dtype=np.int64)
                    if ids.size and (ids.max() >= vocab or ids.min() < 0):
                        raise ValueError(f"tokenizer {tokenizer} produced id {ids.max()} >= vocab {vocab}")
                    offsets.append(n_tok)
                    doms.append(DOMAINS.index(d["domain"]))
                    f.write(eos_arr.tobytes())
                    f.write(ids.astype(dtype).tobytes())
                    n_tok += 1 + ids.size
                    by_dom_tok[d["domain"]] = by_dom_tok.get(d["domain"], 0) + 1 + int(ids.size)
                    by_dom_doc[d["domain"]] = by_dom_doc.get(d["domain"], 0) + 1
                    src = d["id"].split("/", 1)[0]
                    by_src_tok[src] = by_src_tok.get(src, 0) + 1 + int(ids.size)

            batch, chars = [], 0
            for doc in iter_documents(corpus, split, domains=domains):
                batch.append(doc)
                chars += len(doc["text"])
                if len(batch) >= batch_docs or chars >= batch_chars:
                    flush(batch)
                    batch, chars = [], 0
            if batch:
                flush(batch)
            f.write(eos_arr.tobytes())  # closes the last document
            n_tok += 1
        offsets.append(n_tok - 1)
        np.asarray(offsets, dtype=np.int64).tofile(out / names["offsets"])
        np.asarray(doms, dtype=np.uint8).tofile(out / names["domains"])
        dt = time.time() - t0
        meta["splits"][split] = {"tokens": n_tok, "documents": len(doms), "files": names,
                                 "tokens_by_domain": by_dom_tok, "documents_by_domain": by_dom_doc,
                                 "tokens_by_source": by_src_tok, "seconds": round(dt, 2)}
        if split == "train" and not doms:
            raise ValueError(f"{corpus}: no training document{f' in domains {domains}' if domains else ''}; "
                             f"nothing to tokenize")
        log(f"[tokenize] {split}: {n_tok:,} tokens, {len(doms):,} documents in {dt:.1f}s "
            f"({n_tok / max(dt, 1e-9) / 1e6:.2f}M tokens/s)")
    (out / META).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


# ---------------------------------------------------------------------------------------------
# reading


class Shards:
    """One split of a shard directory, validated on open.

    tokens: memmap (N,) · offsets: int64 (D+1,) · domains: uint8 (D,)

    ValueError (naming the file) for: missing files, a size that does not match meta.json, shards
    made with a different tokenizer than `tokenizer` (compared by sha256), ids >= vocab_size, and
    offsets that do not point at <eos> tokens.
    """

    def __init__(self, shard_dir: str | Path, split: str, *, tokenizer: str | Path | None = None,
                 check_ids: bool = True):
        self.dir = Path(shard_dir)
        meta_path = self.dir / META
        if not meta_path.is_file():
            raise ValueError(f"{meta_path}: missing shard sidecar (run `kvshift data tokenize`)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_path}: corrupt sidecar JSON ({e})") from None
        check_shard_meta(self.meta, meta_path, FORMAT)  # every field, and file names inside the directory
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        if split not in self.meta["splits"]:
            raise ValueError(f"{meta_path}: no split {split!r} (have {sorted(self.meta['splits'])})")
        self.split = split
        info = self.meta["splits"][split]
        self.vocab_size = int(self.meta["vocab_size"])
        self.eos_id = int(self.meta["eos_id"])
        self.dtype = np.dtype(self.meta["dtype"])
        if self.dtype != token_dtype(self.vocab_size) and self.dtype != np.uint32:
            raise ValueError(f"{meta_path}: dtype {self.dtype} cannot hold vocab_size {self.vocab_size}")
        self.domain_names: list[str] = list(self.meta["domains"])
        n, d = int(info["tokens"]), int(info["documents"])
        files = {k: self.dir / v for k, v in info["files"].items()}
        for key, dt, count in (("tokens", self.dtype, n), ("offsets", np.dtype(np.int64), d + 1),
                               ("domains", np.dtype(np.uint8), d)):
            p = files[key]
            if not p.is_file():
                raise ValueError(f"{p}: shard file missing")
            size = p.stat().st_size
            if size != count * dt.itemsize:
                raise ValueError(f"{p}: truncated or corrupt shard: {size:,} bytes, but {META} expects "
                                 f"{count:,} x {dt.name} = {count * dt.itemsize:,} bytes")
        self.token_file = files["tokens"]
        if tokenizer is not None:
            tp = Path(tokenizer)
            if tp.is_dir() and (tp / "tokenizer.json").is_file():  # a model directory
                tokenizer = tp / "tokenizer.json"
            src = self.meta.get("tokenizer_source") or {}
            if is_gguf(tokenizer) and src.get("sha256") == file_sha256(tokenizer):
                tokenizer = None  # the GGUF these shards' tokenizer came from
        if tokenizer is not None:
            sha = file_sha256(tokenizer)
            if sha != self.meta["tokenizer_sha256"]:
                raise ValueError(f"{self.token_file}: made with another tokenizer (sha256 "
                                 f"{self.meta['tokenizer_sha256'][:12]}…) than {tokenizer} ({sha[:12]}…)")
        self.tokens = np.memmap(files["tokens"], dtype=self.dtype, mode="r", shape=(n,)) if n else np.zeros(0, self.dtype)
        self.offsets = np.fromfile(files["offsets"], dtype=np.int64)
        self.domains = np.fromfile(files["domains"], dtype=np.uint8)
        if check_ids:
            self._check_ids()
        o = self.offsets
        if d and (o[0] != 0 or o[-1] != n - 1 or np.any(np.diff(o) <= 0)):
            raise ValueError(f"{files['offsets']}: document offsets are not increasing from 0 to N-1")
        if d and np.any(self.tokens[o] != self.eos_id):
            raise ValueError(f"{files['offsets']}: offsets do not point at <eos> (id {self.eos_id}) tokens of "
                             f"{self.token_file}; shard and offsets out of sync")
        if d and self.domains.max(initial=0) >= len(self.domain_names):
            raise ValueError(f"{files['domains']}: domain id {self.domains.max()} >= {len(self.domain_names)}")

    def _check_ids(self, chunk: int = 1 << 24):
        for s in range(0, len(self.tokens), chunk):
            part = self.tokens[s:s + chunk]
            if part.size and int(part.max()) >= self.vocab_size:
                bad = s + int(np.argmax(part >= self.vocab_size))
                raise ValueError(f"{self.token_file}: token id {int(self.tokens[bad])} at position {bad:,} is "
                                 f">= vocab_size {self.vocab_size}")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_documents(self) -> int:
        return len(self.domains)


# ---------------------------------------------------------------------------------------------
# subsetting and packing (carry a corpus to a machine without `tokenizers`)


def subset_shards(src: str | Path, dst: str | Path, *, max_train_tokens: int | None = None, seed: int = 0,
                  max_val_tokens: int | None = None) -> dict:
    """Copies `src` to `dst` keeping a seeded random subset of training documents (drawn from all
    domains alike) with at most `max_train_tokens` tokens, and likewise of validation documents with
    `max_val_tokens`; None keeps the split whole, in order (byte-identical tokens)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    meta = json.loads((src / META).read_text())
    check_shard_meta(meta, src / META, FORMAT)
    for split in meta["splits"]:
        sh = Shards(src, split, check_ids=False)
        o = sh.offsets
        lens = np.diff(o)  # each document with its opening eos; the closing eos is re-added below
        order = np.arange(sh.n_documents)
        limit = max_train_tokens if split == "train" else max_val_tokens
        if limit is not None:
            rng = np.random.default_rng(seed)
            order = rng.permutation(sh.n_documents)
            keep_n = int(np.searchsorted(np.cumsum(lens[order]), limit - 1, side="right"))
            order = np.sort(order[:keep_n])
        parts, new_off, pos = [], [], 0
        for i in order:
            seg = np.asarray(sh.tokens[o[i]:o[i + 1]])
            parts.append(seg)
            new_off.append(pos)
            pos += seg.size
        parts.append(np.array([sh.eos_id], dtype=sh.dtype))
        toks = np.concatenate(parts) if parts else np.zeros(0, sh.dtype)
        new_off.append(pos)
        names = _files(split)
        toks.tofile(dst / names["tokens"])
        np.asarray(new_off, dtype=np.int64).tofile(dst / names["offsets"])
        doms = sh.domains[order]
        doms.tofile(dst / names["domains"])
        info = meta["splits"][split]
        if limit is not None:
            info.pop("tokens_by_source", None)  # not tracked per document
            info.pop("bytes", None)  # of the whole split: bits/byte would be off
            info.pop("bytes_by_domain", None)
        info.update(tokens=int(toks.size), documents=int(order.size),
                    tokens_by_domain={sh.domain_names[k]: int(v) for k, v in
                                      zip(*np.unique(np.repeat(doms, lens[order].astype(np.int64)), return_counts=True))},
                    documents_by_domain={sh.domain_names[k]: int(v) for k, v in zip(*np.unique(doms, return_counts=True))})
    meta["subset_of"] = {"max_train_tokens": max_train_tokens, "seed": seed,
                         **({"max_val_tokens": max_val_tokens} if max_val_tokens is not None else {})}
    if (src / "tokenizer.json").is_file():  # the shards' own tokenizer travels with them (a pack, a subset)
        shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
    (dst / META).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


@staged_output("out_file", file=True)
def pack_shards(shard_dir: str | Path, out_file: str | Path, *, preset: int = 9) -> int:
    """Writes meta.json and all shard files into one .tar.xz (stdlib lzma); returns its size in bytes.

    Measured on the default corpus (16k BPE, uint16): xz ~0.62 bytes/token on the domain mix,
    ~0.78 on prose alone; gzip -9 ~0.78; storing the uint16 bytes planar made xz worse (0.85).
    """
    shard_dir = Path(shard_dir)
    meta = json.loads((shard_dir / META).read_text())
    check_shard_meta(meta, shard_dir / META, FORMAT)
    for split in meta["splits"]:  # sizes and offsets checked before anything is written
        Shards(shard_dir, split, check_ids=False)
    filt = [{"id": lzma.FILTER_LZMA2, "preset": preset}]
    with lzma.open(out_file, "wb", format=lzma.FORMAT_XZ, filters=filt) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        def add(name: str, data: bytes):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 0
            tar.addfile(ti, io.BytesIO(data))

        add(META, (json.dumps(meta, indent=1) + "\n").encode())
        for info in meta["splits"].values():
            for name in info["files"].values():
                add(name, (shard_dir / name).read_bytes())
        tok = shard_dir / TOKENIZER  # the tokenizer the shards were made with, when they keep it
        if tok.is_file() and file_sha256(tok) == meta["tokenizer_sha256"]:
            add(TOKENIZER, tok.read_bytes())
    return os.path.getsize(out_file)


@staged_output("out", marker=META, clear=("*.tokens.bin", "*.offsets.bin", "*.domains.bin", TOKENIZER))
def unpack_shards(packed: str | Path, out: str | Path) -> dict:
    """Restores a `pack_shards` archive into `out` and validates every split; returns meta.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(packed, mode="r:xz") as tar:
            members = {m.name: m for m in tar.getmembers()}
            if META not in members:
                raise ValueError(f"{packed}: no {META} inside; not a kvshift shard pack")
            meta = json.loads(tar.extractfile(members[META]).read())
            check_shard_meta(meta, f"{packed}:{META}", FORMAT)
            for info in meta["splits"].values():
                for name in info["files"].values():
                    if name not in members or "/" in name or name.startswith("."):
                        raise ValueError(f"{packed}: member {name!r} missing or unsafe")
                    with tar.extractfile(members[name]) as src, open(out / name, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 24)
            if TOKENIZER in members:  # packs made since the tokenizer travels with the shards
                (out / TOKENIZER).write_bytes(tar.extractfile(members[TOKENIZER]).read())
                if file_sha256(out / TOKENIZER) != meta["tokenizer_sha256"]:
                    raise ValueError(f"{packed}: its {TOKENIZER} is not the one meta.json names (sha256 differs)")
    except (tarfile.TarError, lzma.LZMAError, EOFError) as e:
        raise ValueError(f"{packed}: corrupt or truncated pack ({e})") from None
    (out / META).write_text(json.dumps(meta, indent=1) + "\n")
    for split in meta["splits"]:
        Shards(out, split)
    return meta
