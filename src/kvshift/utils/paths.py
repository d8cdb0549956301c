"""File names read from a data file (meta.json, a safetensors index) must stay inside their directory."""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from kvshift.errors import UserError

__all__ = ["plain_name", "inside"]


def plain_name(name, where: str) -> str:
    """`name` when it is a bare file name (no directory part, not hidden, not '..'); UserError
    naming `where` (the file and field that holds it) otherwise."""
    if (not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith(".")
            or PureWindowsPath(name).drive):
        raise UserError(f"{where}: {name!r} is not a plain file name in this directory (absolute, '../', hidden "
                        f"or empty names are refused)")
    return name


def inside(root: str | Path, rel, where: str) -> Path:
    """root / rel for a relative path that stays inside root (checked on the names, so symlinked
    files still work); UserError naming `where` otherwise."""
    if not isinstance(rel, str) or not rel:
        raise UserError(f"{where}: {rel!r} is not a file name")
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or PureWindowsPath(rel).drive or ".." in p.parts:
        raise UserError(f"{where}: {rel!r} points outside {root} (absolute and '../' paths are refused)")
    return Path(root) / p
