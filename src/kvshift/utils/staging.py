"""Outputs that replace user data are written aside and swapped in only when complete.

    @staged_output("out", marker="meta.json")
    def tokenize_corpus(corpus, tokenizer, out): ...    # writes into `out` as before

The decorated function receives, in place of `out`, an empty staging directory next to it (same
file system, hidden name `.<name>.staging-XXXX`). When the function returns, every file in the
stage is fsynced and each top-level entry of the stage replaces the entry of the same name in
`out` (entries matching `clear` go too; any other file in `out` is kept). When it raises, the stage
is deleted and `out` is exactly as it was: a typo, a bad input file or a full disk never costs the
user the previous corpus, shards, pack or export.

The swap is one rename per entry: the `marker` entry (the manifest or meta.json that readers open
first) is removed first and installed last, so a crash in the middle of the swap leaves `out`
without its marker, reported as incomplete by every reader, never a stale marker over new files.
With `file=True` the output is one file, written to a temporary name and renamed over it.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kvshift.errors import UserError
from kvshift.utils.io import fsync_dir

__all__ = ["staged", "staged_output", "check_output_dir"]


def check_output_dir(dst: str | Path, *inputs, protect: str | None = None) -> None:
    """UserError when the output directory `dst` is one of the `inputs` (writing there would replace
    their own files), or holds the file `protect` (e.g. a training checkpoint's MANIFEST.json)."""

    d = Path(dst).resolve()
    for src in inputs:
        if src is not None and d == Path(src).resolve():
            raise UserError(f"{dst}: the output directory is the input {src}; writing there would replace its "
                            f"files: choose another directory")
    if protect and (d / protect).is_file():
        raise UserError(f"{dst}: holds {protect} (not an output directory to overwrite); choose another directory")


def _fsync_tree(root: Path) -> None:
    paths = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _swap(stage: Path, out: Path, marker: str | None, clear: Iterable[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    new = sorted((p.name for p in stage.iterdir()), key=lambda n: n == marker)  # the marker last
    old = {n for n in new if os.path.lexists(out / n)}
    old |= {p.name for pat in clear for p in out.glob(pat)}
    old_order = sorted(old, key=lambda n: n != marker)  # the marker first
    backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
    moved, installed = [], []
    try:
        for n in old_order:
            os.replace(out / n, backup / n)
            moved.append(n)
        for n in new:
            os.replace(stage / n, out / n)
            installed.append(n)
    except BaseException:  # put everything back as it was
        for n in reversed(installed):
            os.replace(out / n, stage / n)
        for n in reversed(moved):
            os.replace(backup / n, out / n)
        shutil.rmtree(backup, ignore_errors=True)
        raise
    fsync_dir(out)
    shutil.rmtree(backup, ignore_errors=True)


@contextmanager
def staged(out: str | Path, *, marker: str | None = None, clear: Iterable[str] = (),
           file: bool = False) -> Iterator[Path]:
    """Yields the staging path for `out` (a directory, or with file=True a file path); see the module
    docstring."""
    final = Path(out).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    if file:
        if final.is_dir():
            raise IsADirectoryError(21, "is a directory, expected a file path", str(out))
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.staging-", dir=final.parent)
        os.close(fd)
        stage = Path(name)
    else:
        if final.exists() and not final.is_dir():
            raise NotADirectoryError(20, "exists and is not a directory", str(out))
        stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    try:
        yield stage
        _fsync_tree(stage)
        if file:
            os.replace(stage, final)
            fsync_dir(final.parent)
        else:
            _swap(stage, final, marker, clear)
    finally:
        if file:
            stage.unlink(missing_ok=True)
        else:
            shutil.rmtree(stage, ignore_errors=True)


def staged_output(param: str, *, marker: str | None = None, clear: Iterable[str] = (), file: bool = False):
    """Decorator: the function's argument `param` (an output directory or file) is replaced by a
    staging path that is swapped in when the function returns (see the module docstring). A
    returned staging path is returned as the real one."""
    clear = tuple(clear)

    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            final = Path(bound.arguments[param])
            with staged(final, marker=marker, clear=clear, file=file) as stage:
                bound.arguments[param] = stage
                res = fn(*bound.args, **bound.kwargs)
            return final if isinstance(res, Path) and res == stage else res

        return wrapper

    return deco
