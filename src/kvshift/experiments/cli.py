"""`kvshift experiment NAME | list`, `kvshift reproduce [--quick]`, `kvshift report`."""

from __future__ import annotations

from pathlib import Path

from kvshift.experiments.base import RunOptions
from kvshift.experiments.registry import EXPERIMENTS, get
from kvshift.experiments.report import write_report

QUICK = ("induction-depth", "landscape")
FULL_CPU = ("induction-depth", "induction-control", "induction-width", "ngram", "shift-dynamics", "landscape")


def _csv(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _seeds(seeds: str | None, n_seeds: int | None) -> int | list[int] | None:
    """--seeds 0,2,4 (which seeds) or --n-seeds 3 (seeds 0..2); not both."""
    if seeds is not None and n_seeds is not None:
        raise ValueError("give --seeds (a list) or --n-seeds (a count), not both")
    if seeds is not None:
        try:
            return [int(x) for x in seeds.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--seeds takes comma-separated seed numbers (e.g. 0,1,2), got {seeds!r}") from None
    return n_seeds


# RunOptions fields an experiment reads only when its record lists them (the rest every experiment reads)
_OPTIONAL = {"only": None, "arms": None, "shards": None, "inputs": [], "overrides": [], "tag": None, "note": None}


def results_dir(name: str, opts: RunOptions) -> Path:
    e = get(name)
    if opts.out is not None:
        return Path(opts.out)
    if e.results_dir is not None:
        return e.results_dir(opts)
    return Path("results") / f"{name}-{opts.scale}"


def run_experiment(name: str, opts: RunOptions) -> dict:
    """Runs (or, with opts.summarize_only, re-summarises) one experiment into its results directory."""
    e = get(name)
    if opts.scale not in e.scales:
        raise ValueError(f"{name} runs at scale {' or '.join(e.scales)}, not {opts.scale!r}")
    unused = [f for f, default in _OPTIONAL.items() if getattr(opts, f) != default and f not in e.options]
    if unused:
        raise ValueError(f"{name} does not use --{', --'.join(f.replace('_', '-') for f in unused)}")
    out = results_dir(name, opts)
    out.mkdir(parents=True, exist_ok=True)
    if opts.summarize_only:
        if e.summarize is None:
            raise ValueError(f"{name} has no published runs to re-summarise: run it")
        return e.summarize(opts, out)
    return e.run(opts, out)


def _options(a) -> RunOptions:
    return RunOptions(scale=a.scale, out=Path(a.out) if a.out else None, runs=Path(a.runs), seeds=_seeds(a.seeds, a.n_seeds),
                      steps=a.steps, only=_csv(a.only), arms=_csv(a.arms), shards=Path(a.shards) if a.shards else None,
                      inputs=list(a.input), overrides=list(a.set), keep_checkpoints=a.keep_checkpoints,
                      summarize_only=a.summarize, tag=a.tag, note=a.note)


def _experiment(a) -> int:
    if a.name == "list":
        for name, e in EXPERIMENTS.items():
            print(f"{name:<20} {e.ref:<16} {e.description}")
        return 0
    opts = _options(a)
    s = run_experiment(a.name, opts)
    if "verdict" in s:
        print(f"\n{a.name}: {s['verdict']} — {s.get('verdict_text', '')}")
    print(f"results in {results_dir(a.name, opts)}")
    return 0


def _reproduce(a) -> int:
    names = QUICK if a.quick else tuple(_csv(a.experiments) or FULL_CPU)
    rows = []
    for n in names:
        opts = RunOptions(scale=a.scale, runs=Path(a.runs))
        s = run_experiment(n, opts)
        rows.append((n, s.get("verdict", ""), s.get("verdict_text", ""), results_dir(n, opts)))
        if "arms" in s:
            print(f"\n{n} ({a.scale} scale)")
            print(f"{'arm':<14} {'final acc':>9} {'best acc':>9} {'step to 90%':>12}")
            for arm, r in s["arms"].items():
                st = r["steps_to"]["0.9"]["median_step"]
                print(f"{arm:<14} {r['final_accuracy']:>9.3f} {r['best_accuracy']:>9.3f} "
                      f"{str(st if st is not None else 'never'):>12}")
    print()
    for n, v, t, d in rows:
        print(f"{n}: {v} — {t}\n  plot: {d / 'plot.png'}")
    print(f"report: {write_report()}")
    return 0


def _report(a) -> int:
    print(f"wrote {write_report(a.results, a.out)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("experiment", help="run a named experiment (see `kvshift experiment list`)")
    p.add_argument("name", help="experiment name, or 'list'")
    p.add_argument("--scale", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--seeds", default=None, help="which seeds, comma-separated (0,1,2); default: the experiment's own")
    p.add_argument("--n-seeds", type=int, default=None, help="seeds 0..N-1 (instead of --seeds)")
    p.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    p.add_argument("--out", default=None, help="results directory (default results/<name>-<scale>)")
    p.add_argument("--runs", default="runs", help="scratch directory for run directories and checkpoints")
    p.add_argument("--only", default=None, help="comma-separated parts (e.g. 10m,50m; lr=0.01)")
    p.add_argument("--arms", default=None, help="comma-separated arms")
    p.add_argument("--shards", default=None, help="token shard directory (language-model experiments)")
    p.add_argument("--input", action="append", default=[], metavar="KEY=PATH",
                   help="an input of the experiments that train nothing (lm-downstream: ARM=DIR; pipeline: "
                        "sizes=DIR, scaling=DIR)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="run-config override applied last (language-model experiments; smoke tests)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every run's checkpoints in --runs")
    p.add_argument("--summarize", action="store_true", help="rebuild the summary from the runs already in --out")
    p.add_argument("--tag", default=None, help="a label for the inputs (lm-downstream: the model size)")
    p.add_argument("--note", default=None, help="a sentence for the summary and the report row")
    p.set_defaults(func=_experiment)
    r = sub.add_parser("reproduce", help="run the reproduction suite (--quick: CPU induction-depth + landscape)")
    r.add_argument("--quick", action="store_true")
    r.add_argument("--scale", default="cpu", choices=["cpu", "gpu"])
    r.add_argument("--runs", default="runs", help="scratch directory for run directories and checkpoints")
    r.add_argument("--experiments", default=",".join(FULL_CPU))
    r.set_defaults(func=_reproduce)
    q = sub.add_parser("report", help="regenerate docs/REPRODUCTION.md from results/")
    q.add_argument("--results", default=None)
    q.add_argument("--out", default=None)
    q.set_defaults(func=_report)
