"""Carry a file larger than one device call in parts, bit for bit: `kvshift data split` / `kvshift data join`.

A device call carries at most 64 MiB of the working tree, and SmolLM2-135M's GGUF is 98 MB. `split_file`
cuts a file into parts of at most `part_bytes` and writes a manifest (FILE.parts.json) with the sha256 of
every part and of the whole; `join_file` checks every part and the whole against it while it
concatenates, so what is reassembled on the device is the source file exactly (or an error naming the
part that is missing or differs). Needs nothing beyond the standard library.

    kvshift data split FILE.gguf --out cache/upcycle --part-mib 46
        -> cache/upcycle/FILE.gguf.part0, .part1, ..., FILE.gguf.parts.json
    kvshift data join cache/upcycle/FILE.gguf.parts.json --out FILE.gguf
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from kvshift.utils.io import file_sha256, write_json_atomic
from kvshift.utils.paths import plain_name

__all__ = ["split_file", "join_file", "MANIFEST_SUFFIX"]

MANIFEST_SUFFIX = ".parts.json"
FORMAT = "kvshift-parts-v1"
_CHUNK = 1 << 22


def split_file(src: str | Path, out_dir: str | Path, *, part_bytes: int) -> dict:
    """Writes src's parts and manifest into out_dir; returns the manifest."""
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_file():
        raise ValueError(f"{src}: no such file to split")
    if part_bytes < 1:
        raise ValueError(f"part size must be positive, got {part_bytes}")
    out_dir.mkdir(parents=True, exist_ok=True)
    size = src.stat().st_size
    parts, whole = [], hashlib.sha256()
    with open(src, "rb") as f:
        i = 0
        while True:
            name = f"{src.name}.part{i}"
            h, n = hashlib.sha256(), 0
            tmp = out_dir / (name + ".tmp")
            with open(tmp, "wb") as g:
                while n < part_bytes:
                    buf = f.read(min(_CHUNK, part_bytes - n))
                    if not buf:
                        break
                    g.write(buf)
                    h.update(buf)
                    whole.update(buf)
                    n += len(buf)
            if n == 0 and i > 0:
                tmp.unlink()
                break
            os.replace(tmp, out_dir / name)
            parts.append({"name": name, "bytes": n, "sha256": h.hexdigest()})
            i += 1
            if n < part_bytes:
                break
    man = {"format": FORMAT, "file": src.name, "bytes": size, "sha256": whole.hexdigest(), "parts": parts}
    write_json_atomic(out_dir / (src.name + MANIFEST_SUFFIX), man)
    return man


def join_file(manifest: str | Path, out: str | Path) -> dict:
    """Reassembles the file of a `split_file` manifest into `out`, checking every part and the whole;
    returns the manifest. ValueError naming the part (or the whole) that is missing or differs; `out` is
    only ever the complete, checked file (written beside it, then renamed)."""
    manifest, out = Path(manifest), Path(out)
    try:
        man = json.loads(manifest.read_text())
    except FileNotFoundError:
        raise ValueError(f"{manifest}: no such parts manifest") from None
    except ValueError as e:
        raise ValueError(f"{manifest}: not a parts manifest ({e})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT or not isinstance(man.get("parts"), list):
        raise ValueError(f"{manifest}: not a {FORMAT} manifest")
    if out.is_file() and out.stat().st_size == man["bytes"] and file_sha256(out) == man["sha256"]:
        return man  # already joined
    tmp = out.with_name(out.name + ".joining")
    whole, n = hashlib.sha256(), 0
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as g:
            for p in man["parts"]:
                path = manifest.parent / plain_name(p["name"], f"{manifest}: part name")
                if not path.is_file():
                    raise ValueError(f"{path}: part missing (carry it; {len(man['parts'])} parts in {manifest})")
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while buf := f.read(_CHUNK):
                        h.update(buf)
                        whole.update(buf)
                        g.write(buf)
                        n += len(buf)
                if h.hexdigest() != p["sha256"]:
                    raise ValueError(f"{path}: sha256 {h.hexdigest()[:12]}… differs from the manifest's "
                                     f"{p['sha256'][:12]}… (a damaged or different part)")
        if n != man["bytes"] or whole.hexdigest() != man["sha256"]:
            raise ValueError(f"{manifest}: the joined parts ({n:,} bytes, sha256 {whole.hexdigest()[:12]}…) are not "
                             f"{man['file']} ({man['bytes']:,} bytes, {man['sha256'][:12]}…)")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return man
