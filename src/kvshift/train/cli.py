"""`kvshift train | compare | plot` (registered by kvshift.cli through `register(subparsers)`).

    kvshift train CONFIG.toml [--set section.key=value ...] [--resume] [--out DIR] [--fsdp]
    torchrun --nproc_per_node=8 -m kvshift.cli train CONFIG.toml --fsdp ...
    kvshift compare CONFIG --arms vanilla,kvshift [--seeds 0,1,2] [--set ...] [--out DIR]
    kvshift plot RUN [RUN ...] [--out PNG]

CONFIG is a TOML path or the name of a shipped config (kvshift/configs/<name>.toml). `train` exits
0 when finished, 2 for a user mistake (config, data, checkpoints, a refused --resume: one line on
stderr), 3 when the run diverged, 75 when stopped by SIGTERM/SIGINT after a checkpoint.
Only the standard library is imported here; torch is imported when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvshift.errors import command_name, run_command
from kvshift.train import distributed as D
from kvshift.train.compare import compare
from kvshift.train.config import load_config
from kvshift.train.plot import plot_runs
from kvshift.train.trainer import train

__all__ = ["register"]


def _default_out(config: str, prefix: str) -> Path:
    return Path("runs") / f"{prefix}{Path(config).stem}"


def cmd_train(args) -> int:

    cfg = load_config(args.config, args.set)
    out = Path(args.out) if args.out else _default_out(args.config, "")
    try:
        summary = train(cfg, out, resume=args.resume, fsdp=args.fsdp, command=" ".join(["kvshift", *sys.argv[1:]]))
    finally:
        D.teardown()
    return summary["exit_code"]


def cmd_compare(args) -> int:

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    out = Path(args.out) if args.out else _default_out(args.config, "compare-")
    try:
        res = compare(args.config, arms, seeds, overrides=args.set, out=out, fsdp=args.fsdp)
    finally:
        D.teardown()
    return 75 if res.get("status") == "interrupted" else 0


def cmd_plot(args) -> int:

    out = plot_runs(args.runs, args.out)
    print(out)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train one LM run from a TOML config",
                              description="Train one LM run. Exit 0 finished, 3 diverged, 75 interrupted "
                                          "(checkpoint written; rerun with --resume).")
    p.add_argument("config", help="TOML file, or a shipped config name (debug, lm-10m, ...)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set model.attention=vanilla")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    p.add_argument("--out", help="run directory (default runs/<config name>)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 instead of DDP")
    p.set_defaults(func=cmd_train)

    c = subparsers.add_parser("compare", help="train several attention kinds with identical init and data")
    c.add_argument("config")
    c.add_argument("--arms", default="vanilla,kvshift", help="comma-separated attention kinds; first = baseline")
    c.add_argument("--seeds", default="0", help="comma-separated seeds (init and data order)")
    c.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    c.add_argument("--out", help="results directory (default runs/compare-<config name>)")
    c.add_argument("--fsdp", action="store_true")
    c.set_defaults(func=cmd_compare)

    pl = subparsers.add_parser("plot", help="overlay train/val loss against tokens of run directories")
    pl.add_argument("runs", nargs="+")
    pl.add_argument("--out", default="loss.png")
    pl.set_defaults(func=cmd_plot)


def main(argv: list[str] | None = None) -> int:  # `python -m kvshift.train.cli ...` without the top-level CLI
    parser = argparse.ArgumentParser(prog="kvshift")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)

    return run_command(command_name(args), args.func, args)


if __name__ == "__main__":
    raise SystemExit(main())
