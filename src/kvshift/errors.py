"""User mistakes versus bugs, and the one place the CLI tells them apart.

A mistake in what a user gave us (a config key or value, a path, a data or checkpoint file) is a
ValueError (`UserError`, `CheckpointError`, `json.JSONDecodeError`, `UnicodeDecodeError` and
`tomllib.TOMLDecodeError` are all ValueErrors) or an OSError (a missing file, no permission, a full
disk). Every `kvshift` verb runs through `run_command`, which prints such an error as one line

    kvshift train: error: /path/to/run.toml: optim.lr must be a finite number > 0, got 'fast'

and returns exit status 2. Any other exception (AttributeError, TypeError, KeyError, RuntimeError,
...) is a bug: it propagates with its traceback. `kvshift --traceback VERB ...` shows the traceback of a
user error too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["UserError", "USER_ERRORS", "EXIT_USAGE", "run_command", "command_name", "one_line"]

EXIT_USAGE = 2  # what argparse returns for a bad command line; kvshift returns it for any user mistake


class UserError(ValueError):
    """A mistake in the user's input (config, paths, data, checkpoints) that the user can fix; its
    message names the file and the field."""


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def one_line(e: BaseException) -> str:
    """The message of a user error on one line; an OSError as `path: reason`."""
    if isinstance(e, OSError) and e.strerror:
        names = [str(x) for x in (e.filename, e.filename2) if x is not None]
        msg = f"{' -> '.join(names)}: {e.strerror}" if names else e.strerror
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())


def command_name(args) -> str:
    """'train', 'data tokenize', ...: the verb of a parsed command line, for error messages."""
    return " ".join(str(x) for x in (getattr(args, "command", None), getattr(args, "data_command", None)) if x)


def run_command(name: str, func: Callable, args, *, traceback: bool = False) -> int:
    """Runs the handler of the verb `name` (e.g. "train", "data tokenize"): its exit code, or
    EXIT_USAGE after printing one line for a user error (see the module docstring)."""
    try:
        return int(func(args) or 0)
    except USER_ERRORS as e:
        if traceback:
            raise
        sys.stderr.write(f"kvshift {name}: error: {one_line(e)}\n")
        sys.stderr.flush()
        return EXIT_USAGE
