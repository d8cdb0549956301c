"""Debian packages as corpus sources: `apt-get download` into CACHE/deb, `dpkg-deb -x` into
CACHE/deb/x/NAME; the extractors of the Debian dictionary and documentation packages."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path

from kvshift.data.clean import html_to_text, rst_to_text
from kvshift.data.sources.base import Doc, FetchError, Source, pages, run

__all__ = ["fetch_deb", "extract_gcide", "extract_wordnet", "extract_linux_doc", "extract_python_doc"]


def fetch_deb(src: Source, cache: Path, offline: bool) -> tuple[Path, str, str]:
    """The package's files extracted under CACHE/deb/x/NAME; (root, version, licence from its copyright file)."""
    root = cache / "deb" / "x" / src.package
    marker = root / ".kvshift.json"
    if not marker.exists():
        if offline:
            raise FetchError(f"{root} missing and --offline given")
        ddir = cache / "deb"
        ddir.mkdir(parents=True, exist_ok=True)
        debs = sorted(ddir.glob(f"{src.package}_*.deb"))
        if not debs:
            run(["apt-get", "download", src.spec], cwd=ddir)
            debs = sorted(ddir.glob(f"{src.package}_*.deb"))
        if not debs:
            raise FetchError(f"apt-get download {src.spec} produced no .deb in {ddir}")
        root.mkdir(parents=True, exist_ok=True)
        run(["dpkg-deb", "-x", str(debs[-1]), str(root)])
        version = run(["dpkg-deb", "-f", str(debs[-1]), "Version"]).strip()
        lic = _deb_license(root / "usr/share/doc" / src.package / "copyright")
        marker.write_text(json.dumps({"deb": debs[-1].name, "version": version, "license": lic}))
    info = json.loads(marker.read_text())
    return root, info["version"], info["license"]


def _deb_license(copyright_file: Path) -> str:
    if not copyright_file.exists():
        return "unknown (no copyright file)"
    text = copyright_file.read_text(errors="replace")
    found = []
    for m in re.finditer(r"^License:\s*(\S.*)$", text, re.M):
        v = m.group(1).strip()
        if v not in found:
            found.append(v)
    return "; ".join(found[:3]) if found else "see /usr/share/doc/*/copyright"


# ---- extractors: root -> (doc_id, raw text)


_DICT_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_GCIDE_TAG = re.compile(r"^\s*\[[^\]]{0,40}\]\s*$")  # "[1913 Webster]", "[PJC]" source tags


def _b64(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _DICT_B64.index(ch)
    return n


def extract_gcide(root: Path) -> Iterator[Doc]:
    d = root / "usr/share/dictd"
    with gzip.open(d / "gcide.dict.dz", "rb") as f:  # dictzip is gzip with a random-access table
        blob = f.read()
    spans = set()
    for line in (d / "gcide.index").read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        spans.add((_b64(parts[1]), _b64(parts[2]), parts[0]))

    def entries():
        last_end = -1
        for off, ln, head in sorted(spans):
            if off < last_end:  # several headwords share one article
                continue
            last_end = off + ln
            text = blob[off:off + ln].decode("utf-8", "replace")
            lines = [x.strip() for x in text.split("\n") if not _GCIDE_TAG.match(x)]
            yield head, "\n".join(lines).strip()

    yield from pages(entries(), 4000)


def extract_linux_doc(root: Path) -> Iterator[Doc]:
    base = next((root / "usr/share/doc").glob("linux-doc-*/html/_sources"))
    for p in sorted(base.rglob("*.rst.txt")):
        text = rst_to_text(p.read_bytes().decode("utf-8", "replace"))
        if len(text) >= 200:
            yield str(p.relative_to(base)), text


def extract_python_doc(root: Path) -> Iterator[Doc]:
    base = next((root / "usr/share/doc").glob("python3*/html"))
    skip = {"genindex", "search", "py-modindex", "contents"}
    for p in sorted(base.rglob("*.html")):
        rel = p.relative_to(base)
        if rel.parts[0].startswith("_") or p.stem in skip or p.stem.startswith("genindex"):
            continue
        text = html_to_text(p.read_bytes().decode("utf-8", "replace"), main_only=True)
        if len(text) >= 200:
            yield str(rel), text


_WN_POS = {"noun": "n.", "verb": "v.", "adj": "adj.", "adv": "adv."}


def extract_wordnet(root: Path) -> Iterator[Doc]:
    base = root / "usr/share/wordnet"

    def entries(pos: str):
        with open(base / f"data.{pos}", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue  # licence header
                head, gloss = line.split("|", 1)
                fields = head.split()
                n = int(fields[3], 16)
                words = [fields[4 + 2 * i].replace("_", " ") for i in range(n)]
                words = [re.sub(r"\([a-z]+\)$", "", w) for w in words]
                yield f"{pos}/{fields[0]}", f"{', '.join(words)} ({_WN_POS[pos]}): {gloss.strip()}"

    for pos in _WN_POS:
        # one synset per line inside a page
        for key, text in pages(entries(pos), 4000):
            yield key, text.replace("\n\n", "\n")
