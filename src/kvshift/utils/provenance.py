"""Where a result came from: the git commit, the command line, versions and the device."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from kvshift import __version__

__all__ = ["git_commit", "command_line", "device_name", "provenance", "environment"]

GIT_COMMIT_ENV = "KVSHIFT_GIT_COMMIT"  # set by scripts/device/*.sh: device machines get the tree without .git


def git_commit() -> str | None:
    """$KVSHIFT_GIT_COMMIT when set, else `git rev-parse HEAD` of the checkout holding this package, with
    "+dirty" when tracked files outside results/ and docs/ differ; None outside git."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        # dirty means the code differs from the commit: results/ and docs/ being rewritten by the command itself
        # (kvshift reproduce writes both) do not count
        top = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", top or str(here), "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!results", ":!docs"], capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def command_line() -> str:
    """The command that is running, as a user would type it (`kvshift ...` for the console script)."""
    if sys.argv and sys.argv[0].endswith(("kvshift", "cli.py")):
        return shlex.join(["kvshift"] + sys.argv[1:])
    return shlex.join(sys.argv)


def device_name(device: torch.device | None = None) -> str:
    """"NVIDIA H200" for a GPU, "cpu (N cores)" otherwise."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def provenance(device: torch.device | None = None) -> dict:
    """The provenance block of every summary.json the experiments write."""
    return {"command": command_line(), "git_commit": git_commit(), "kvshift": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "device": device_name(device),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def environment(device: torch.device) -> dict:
    """The environment block of a training run's summary.json."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "python": sys.version.split()[0],
            "git_commit": git_commit(), "host": platform.node(), "threads": torch.get_num_threads()}
