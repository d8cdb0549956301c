"""The `kvshift` console script: one entry point, subcommands registered by the modules that own them.

A module that adds subcommands exposes `register(subparsers)`; it adds its parsers with
`set_defaults(func=handler)`, and handler(args) returns an exit code (or None for 0). Every handler
runs through `kvshift.errors.run_command`: a user mistake (ValueError, OSError) is one line on
stderr and exit status 2; a bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kvshift.errors import command_name, run_command

# modules that contribute subcommands; missing optional extras only hide their commands
_COMMAND_MODULES = (
    "kvshift.info",
    "kvshift.data.cli",
    "kvshift.train.cli",
    "kvshift.experiments.cli",
    "kvshift.bench.cli",
    "kvshift.cli_hf",  # outside kvshift.hf: importing that package imports transformers
    "kvshift.eval.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvshift", description="KV Shifting Attention: library, training and reproduction suite")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of a user error too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            if getattr(e, "name", None) != name:  # an optional extra is missing, not the module itself
                sys.stderr.write(f"kvshift: commands of {name} unavailable ({e})\n")
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return run_command(command_name(args), args.func, args, traceback=args.traceback)


if __name__ == "__main__":
    raise SystemExit(main())
