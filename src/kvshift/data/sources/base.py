"""What every corpus source shares: the domains, the `Source` record, FetchError, running a package
manager, and grouping small entries into pages."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DOMAINS", "Doc", "FetchError", "Source", "run", "pages"]

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


def run(cmd: list[str], cwd: Path | None = None) -> str:
    """stdout of a package-manager command; FetchError with the tail of its output when it fails."""
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-6:])
        raise FetchError(f"`{' '.join(cmd)}` failed (exit {r.returncode}):\n{tail}")
    return r.stdout


def pages(entries: Iterator[tuple[str, str]], page_chars: int) -> Iterator[Doc]:
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
