"""Corpus builder: offline package sources and users' files -> cleaned jsonl documents + manifest.

Layout of a built corpus directory:

    OUT/manifest.json                 per source: package, version, licence, bytes, words, documents, sha256
    OUT/train/<source>.jsonl          {"id": "<source>/<doc id>", "domain": "<domain>", "text": ...}
    OUT/val/<source>.jsonl

The train/validation split is decided per document by a hash of its id, so a document is never
split and adding or removing other documents or sources never moves one across the split.
Prose has exact repeated paragraphs (>= `dedup_min_chars`) removed across the whole corpus; code
has exact repeated files removed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from kvshift.data.checks import check_not_empty, decode_text
from kvshift.data.clean import ParagraphDedup, normalise
from kvshift.data.sources import DOMAINS, FetchError, default_source_names, fetch, get_source
from kvshift.utils.staging import staged_output

__all__ = ["build_corpus", "split_of", "iter_documents", "read_manifest", "iter_user_files", "MANIFEST"]

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
_SPLIT_SALT = b"kvshift-split-v1:"


def split_of(doc_id: str, val_fraction: float) -> str:
    """'val' for a fixed, hash-chosen `val_fraction` of document ids, else 'train'."""
    h = int.from_bytes(hashlib.sha256(_SPLIT_SALT + doc_id.encode("utf-8")).digest()[:8], "big")
    return "val" if h < val_fraction * 2.0**64 else "train"


class _HashingWriter:
    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, record: dict):
        b = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        self.f.write(b)
        self.sha.update(b)
        self.bytes += len(b)

    def close(self) -> dict:
        self.f.close()
        return {"path": str(self.path.relative_to(self.path.parent.parent)), "sha256": self.sha.hexdigest(),
                "file_bytes": self.bytes}


# ---------------------------------------------------------------------------------------------
# users' own data


def _expand(patterns: Iterable[str]) -> list[Path]:
    paths: list[Path] = []
    for pat in patterns:
        if any(c in pat for c in "*?["):
            hits = sorted(glob.glob(pat, recursive=True))
            if not hits:
                raise ValueError(f"--files: pattern {pat!r} matches no file")
            paths += [Path(h) for h in hits if Path(h).is_file()]
        else:
            p = Path(pat)
            if not p.is_file():
                raise ValueError(f"--files: {pat!r} is not a file")
            paths.append(p)
    return paths


def iter_user_files(patterns: Iterable[str], text_field: str = "text") -> Iterator[tuple[str, str]]:
    """Documents from text files (one file = one document), jsonl (one `text_field` per line) and
    parquet (a `text_field` column, needs pyarrow)."""
    for p in _expand(patterns):
        suffix = p.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            with open(p, "rb") as f:
                for i, raw in enumerate(f):
                    line = decode_text(raw, f"{p}:{i + 1}")
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{p}:{i + 1}: invalid JSON ({e.msg})") from None
                    if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                        raise ValueError(f"{p}:{i + 1}: no string field {text_field!r}")
                    yield f"{p.name}:{i + 1}", rec[text_field]
        elif suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ValueError(f"{p}: reading parquet needs pyarrow (pip install pyarrow)") from None
            table = pq.read_table(p)
            if text_field not in table.column_names:
                raise ValueError(f"{p}: no column {text_field!r} (columns: {table.column_names})")
            for i, t in enumerate(table.column(text_field).to_pylist()):
                if isinstance(t, str):
                    yield f"{p.name}:{i}", t
        else:
            yield p.name, decode_text(p.read_bytes(), str(p))


def _iter_hf(name: str, split: str, text_field: str, max_docs: int | None) -> Iterator[tuple[str, str]]:
    try:
        import datasets
    except ImportError:
        raise ValueError("--hf-dataset needs the `datasets` package (pip install datasets)") from None
    cfg = None
    if ":" in name:
        name, cfg = name.split(":", 1)
    ds = datasets.load_dataset(name, cfg, split=split, streaming=True)
    for i, rec in enumerate(ds):
        if max_docs is not None and i >= max_docs:
            break
        t = rec.get(text_field)
        if isinstance(t, str):
            yield str(i), t


# ---------------------------------------------------------------------------------------------
# build


def _select_sources(sources: list[str] | None, domains: list[str] | None, exclude_domains: list[str] | None):
    names = list(sources) if sources else default_source_names()
    for d in list(domains or []) + list(exclude_domains or []):
        if d not in DOMAINS:
            raise ValueError(f"unknown domain {d!r}; known: {', '.join(DOMAINS)}")
    out = []
    for n in names:
        s = get_source(n)
        if domains and s.domain not in domains:
            continue
        if exclude_domains and s.domain in exclude_domains:
            continue
        out.append(s)
    return out


@staged_output("out", marker=MANIFEST)  # written aside; the old corpus stays until this one is complete
def build_corpus(
    out: str | Path,
    *,
    sources: list[str] | None = None,
    domains: list[str] | None = None,
    exclude_domains: list[str] | None = None,
    cache: str | Path = "cache/data",
    files: list[str] | None = None,
    files_domain: str = "user",
    text_field: str = "text",
    hf_dataset: str | None = None,
    hf_split: str = "train",
    hf_max_docs: int | None = None,
    val_fraction: float = 0.03,
    max_docs_per_source: int | None = None,
    dedup_min_chars: int = 100,
    min_doc_chars: int = 32,
    offline: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Builds the corpus into `out` and returns the manifest (also written to out/manifest.json).

    `sources=[]` with `files` builds from the user's files only. A source that fails to fetch is
    recorded in the manifest under "failed" and skipped.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if files_domain not in DOMAINS:
        raise ValueError(f"files_domain {files_domain!r} not in {DOMAINS}")
    out = Path(out)
    selected = _select_sources(sources, domains, exclude_domains) if sources != [] else []
    paths = [str(p) for p in _expand(files)] if files else []  # a typo fails before any fetching
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)

    # (name, domain, kind, package, version, package_licence, text licence, docs iterator factory)
    plan: list[tuple] = []
    failed: dict[str, str] = {}
    for s in selected:
        t0 = time.time()
        try:
            root, version, pkg_lic = fetch(s, Path(cache), offline=offline)
        except (FetchError, OSError) as e:
            failed[s.name] = str(e)
            log(f"[corpus] {s.name}: FETCH FAILED, skipped: {e}")
            continue
        log(f"[corpus] {s.name}: {s.kind} {s.package} {version} ready ({time.time() - t0:.1f}s)")
        plan.append((s.name, s.domain, s.kind, s.package, version, pkg_lic, s.license, lambda s=s, r=root: s.extract(r)))
    if files:
        plan.append(("files", files_domain, "files", ",".join(paths)[:500], "", "user-provided", "user-provided",
                     lambda: iter_user_files(paths, text_field)))
    if hf_dataset:
        plan.append((f"hf-{hf_dataset.replace('/', '_').replace(':', '_')}", files_domain, "hf", hf_dataset, hf_split,
                     "see dataset card", "see dataset card", lambda: _iter_hf(hf_dataset, hf_split, text_field, hf_max_docs)))
    if not plan:
        raise ValueError("nothing to build: no source selected (or all failed) and no --files")

    para_dedup = ParagraphDedup(dedup_min_chars)
    seen_code: set[bytes] = set()
    records, seen = [], {}
    for name, domain, kind, package, version, pkg_lic, text_lic, docs in plan:
        t0 = time.time()
        writers = {sp: _HashingWriter(out / sp / f"{name}.jsonl") for sp in SPLITS}
        stats = {sp: {"documents": 0, "bytes": 0, "words": 0} for sp in SPLITS}
        dup_files = short = 0
        drops_before = para_dedup.dropped
        n_seen = 0
        seen_ids: set[str] = set()
        for doc_id, raw in docs():
            if max_docs_per_source is not None and n_seen >= max_docs_per_source and kind not in ("files", "hf"):
                break
            n_seen += 1
            code = domain == "code"
            text = normalise(raw, code=code)
            if code:
                h = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
                if h in seen_code:
                    dup_files += 1
                    continue
                seen_code.add(h)
            else:
                text = para_dedup(text)
            if len(text) < min_doc_chars:
                short += 1
                continue
            full_id = f"{name}/{doc_id}"
            assert full_id not in seen_ids, f"duplicate document id {full_id}"
            seen_ids.add(full_id)
            sp = split_of(full_id, val_fraction)
            writers[sp].write({"id": full_id, "domain": domain, "text": text})
            st = stats[sp]
            st["documents"] += 1
            st["bytes"] += len(text.encode("utf-8"))
            st["words"] += len(text.split())
        outputs = {sp: w.close() for sp, w in writers.items()}
        rec = {
            "name": name, "domain": domain, "kind": kind, "package": package, "version": version,
            "package_license": pkg_lic, "license": text_lic,
            "documents": stats["train"]["documents"] + stats["val"]["documents"],
            "bytes": stats["train"]["bytes"] + stats["val"]["bytes"],
            "words": stats["train"]["words"] + stats["val"]["words"],
            "splits": {sp: {**stats[sp], **outputs[sp]} for sp in SPLITS},
            "dropped_paragraphs": para_dedup.dropped - drops_before,
            "dropped_duplicate_files": dup_files,
            "dropped_short": short,
            "seconds": round(time.time() - t0, 2),
        }
        records.append(rec)
        log(f"[corpus] {name:22s} {domain:10s} docs={rec['documents']:>8,} bytes={rec['bytes']:>13,} "
            f"words={rec['words']:>12,} dup_paras={rec['dropped_paragraphs']:,} dup_files={dup_files:,} "
            f"({rec['seconds']:.1f}s)")
        seen[name] = n_seen
        if n_seen and not rec["documents"]:
            log(f"[corpus] WARNING {name}: none of its {n_seen:,} documents kept ({short:,} shorter than "
                f"{min_doc_chars} characters after cleaning, {dup_files:,} duplicates)")
    check_not_empty(records, seen, min_doc_chars)

    manifest = {
        "format": "kvshift-corpus-v1",
        "val_fraction": val_fraction,
        "split_rule": "sha256('kvshift-split-v1:' + id)[:8] as big-endian int < val_fraction * 2**64 -> val",
        "dedup_min_chars": dedup_min_chars,
        "domains": list(DOMAINS),
        "sources": records,
        "failed": failed,
        "totals": {k: sum(r[k] for r in records) for k in ("documents", "bytes", "words")},
        "by_domain": {
            d: {k: sum(r[k] for r in records if r["domain"] == d) for k in ("documents", "bytes", "words")}
            for d in DOMAINS if any(r["domain"] == d for r in records)
        },
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(corpus: str | Path) -> dict:
    p = Path(corpus) / MANIFEST
    if not p.is_file():
        raise ValueError(f"{p}: no corpus manifest (run `kvshift data build-corpus` first)")
    return json.loads(p.read_text())


def iter_documents(corpus: str | Path, split: str, *, domains: list[str] | None = None) -> Iterator[dict]:
    """Documents of one split in manifest order (source order, then file order)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    corpus = Path(corpus)
    for rec in read_manifest(corpus)["sources"]:
        if domains and rec["domain"] not in domains:
            continue
        path = corpus / split / f"{rec['name']}.jsonl"
        if not path.is_file():
            raise ValueError(f"{path}: listed in the manifest but missing")
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)
