"""Files: atomic writes, sha256, JSON and JSON-lines records."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

__all__ = ["fsync_dir", "write_atomic", "write_json_atomic", "write_text_atomic", "file_sha256", "read_jsonl",
           "read_json", "finite"]


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write) -> None:
    """`write(f)` into a temporary file beside `path`, fsync, then rename over `path`: readers see the old file
    or the new one. The temporary name carries the process id, so processes writing the same file at once
    (several jobs of one experiment summarising into one directory) never rename each other's file away."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def write_json_atomic(path: str | Path, obj, indent: int = 1) -> None:
    path = Path(path)
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=indent) + "\n").encode()))
    fsync_dir(path.parent)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str | Path) -> dict:
    """A JSON file; a ValueError naming the file when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines file (metrics.jsonl); a torn line (a killed writer) is skipped."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def finite(x):
    """JSON has no NaN/inf: write them as strings so a file stays strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x
