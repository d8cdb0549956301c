"""`kvshift experiment NAME`, `kvshift reproduce --quick`, `kvshift report`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvshift.experiments import get, load_all


def results_root() -> Path:
    return Path(os.environ.get("KVSHIFT_RESULTS", "results"))


def run_experiment(name: str, scale: str = "cpu", seeds: int = 1, steps: int | None = None, out: str | None = None) -> dict:
    fn = get(name)
    if scale not in ("cpu", "gpu"):
        raise ValueError(f"scale must be 'cpu' or 'gpu', got {scale!r}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    out = out or str(results_root() / f"{name}-{scale}")
    Path(out).mkdir(parents=True, exist_ok=True)
    return fn(scale=scale, seeds=seeds, steps=steps, out=out)


def _experiment(args) -> int:
    s = run_experiment(args.name, args.scale, args.seeds, args.steps, args.out)
    print(f"\n{args.name}: {s.get('verdict', '')} — {s.get('verdict_text', '')}")
    print(f"results in {args.out or results_root() / (args.name + '-' + args.scale)}")
    return 0


def _list(args) -> int:
    for name, (_, desc) in sorted(load_all().items()):
        print(f"{name:<22} {desc}")
    return 0


def _reproduce(args) -> int:
    names = ["induction-depth", "landscape"] if args.quick else args.experiments.split(",")
    rows = []
    for n in names:
        s = run_experiment(n, args.scale, 1, None, None)
        rows.append((n, s.get("verdict", ""), s.get("verdict_text", ""), results_root() / f"{n}-{args.scale}"))
        if "arms" in s:
            print(f"\n{n} ({args.scale} scale)")
            print(f"{'arm':<14} {'final acc':>9} {'best acc':>9} {'step to 90%':>12}")
            for arm, a in s["arms"].items():
                st = a["steps_to"]["0.9"]["median_step"]
                print(f"{arm:<14} {a['final_accuracy']:>9.3f} {a['best_accuracy']:>9.3f} {str(st if st is not None else 'never'):>12}")
    print()
    for n, v, t, d in rows:
        print(f"{n}: {v} — {t}\n  plot: {d / 'plot.png'}")
    from kvshift.experiments.report import write_report
    print(f"report: {write_report()}")
    return 0


def _report(args) -> int:
    path = write_report(args.results, args.out)
    print(f"wrote {path}")
    return 0


def write_report(results=None, out=None):
    from kvshift.experiments.report import write_report as w
    return w(results, out)


def register(sub) -> None:
    p = sub.add_parser("experiment", help="run a named experiment of the paper (see `kvshift experiment list`)")
    p.add_argument("name", help="experiment name, or 'list'")
    p.add_argument("--scale", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="override the scale's number of steps")
    p.add_argument("--out", default=None, help="results directory (default results/<name>-<scale>)")
    p.set_defaults(func=lambda a: _list(a) if a.name == "list" else _experiment(a))
    r = sub.add_parser("reproduce", help="run the reproduction suite (--quick: CPU induction-depth + landscape)")
    r.add_argument("--quick", action="store_true")
    r.add_argument("--scale", default="cpu", choices=["cpu", "gpu"])
    r.add_argument("--experiments", default="induction-depth,induction-width,ngram,shift-dynamics,landscape")
    r.set_defaults(func=_reproduce)
    q = sub.add_parser("report", help="regenerate docs/REPRODUCTION.md from results/")
    q.add_argument("--results", default=None)
    q.add_argument("--out", default=None)
    q.set_defaults(func=_report)
