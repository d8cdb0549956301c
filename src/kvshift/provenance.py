"""The git commit of the running code, for every summary this package writes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = ["git_commit"]


def git_commit() -> str | None:
    """$KVSHIFT_GIT_COMMIT when set (device machines get the tree without a usable .git), else `git rev-parse
    HEAD` of the checkout holding this package, with "+dirty" when tracked files differ; None outside git."""
    if os.environ.get("KVSHIFT_GIT_COMMIT"):
        return os.environ["KVSHIFT_GIT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
