"""What every experiment shares: its registry record, the options of a run, the verdict vocabulary and the
results directory it writes.

An experiment is one `Experiment` record (name, the paper's claim, the verdict rule in words, and the
functions that run it and rebuild its summary); `kvshift.experiments.registry` lists them all. Running an
experiment writes results/<name>-<scale>/ and nothing else under results/: summary.json (verdict,
verdict_text, provenance, numbers), README.md, plot.png and, where it has them, metrics.jsonl and runs/
(each run's small files, never checkpoints). Checkpoints and run directories live in the scratch
directory `RunOptions.runs` (default runs/). No experiment reads another experiment's results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kvshift.utils.io import write_text_atomic

__all__ = ["Experiment", "RunOptions", "VERDICTS", "SCALES", "ResultsLog", "write_summary", "check_verdict", "fmt"]

# The verdict vocabulary of every summary.json and of the report.
#   reproduced         the run had the power to show the claim, and it showed it
#   partly reproduced  part of the claim held (the row says which part)
#   not reproduced     the run had the power to show the claim, and it did not
#   inconclusive       the run could not test the claim (budget, a setup that learned nothing); the row
#                      says what budget would
VERDICTS = ("reproduced", "partly reproduced", "not reproduced", "inconclusive")
SCALES = ("cpu", "gpu")


def check_verdict(verdict: str) -> str:
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    return verdict


@dataclass
class RunOptions:
    """What `kvshift experiment NAME ...` passes to an experiment. Every field has a CLI flag; nothing is read
    from the environment."""
    scale: str = "cpu"
    out: Path | None = None  # results directory (default results/<name>-<scale>)
    runs: Path = Path("runs")  # scratch: run directories and checkpoints
    seeds: int | list[int] | None = None  # a count or a list (None: the experiment's default)
    steps: int | None = None  # override the training steps (smoke tests, short runs)
    only: list[str] | None = None  # parts of the experiment to run (e.g. sizes)
    arms: list[str] | None = None  # arms to run
    shards: Path | None = None  # token shards (language-model experiments)
    inputs: list[str] = field(default_factory=list)  # input files of the experiments that train nothing
    overrides: list[str] = field(default_factory=list)  # `section.key=value` run-config overrides, applied last
    keep_checkpoints: bool = False  # keep every run's checkpoints in the scratch directory
    summarize_only: bool = False  # rebuild the summary from the runs already published
    tag: str | None = None  # a label for the inputs (e.g. the model size of an evaluated pair)
    note: str | None = None  # a sentence for the report row (how the inputs were made)
    log: Callable[[str], None] = print

    def __post_init__(self):
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        self.runs = Path(self.runs)

    def seed_list(self, default: list[int] | tuple[int, ...] = (0,)) -> list[int]:
        if self.seeds is None:
            return list(default)
        if isinstance(self.seeds, int):
            if self.seeds < 1:
                raise ValueError(f"seeds must be >= 1, got {self.seeds}")
            return list(range(self.seeds))
        return [int(s) for s in self.seeds]


@dataclass(frozen=True)
class Experiment:
    """One experiment: the claim it tests and how. `run(opts, out)` computes and writes out/ and returns the
    summary; `summarize(opts, out)` (where runs are published) rebuilds it from what out/ holds."""
    name: str
    ref: str  # where the claim is in the paper ("Fig. 1a", "App. H"), or "beyond the paper"
    claim: str | None  # the paper's claim in one line (None: evidence without a verdict, no report row)
    rule: str | None  # how the verdict is decided, in words (the report prints it)
    description: str  # one line for `kvshift experiment list`
    run: Callable[[RunOptions, Path], dict]
    summarize: Callable[[RunOptions, Path], dict] | None = None
    scales: tuple[str, ...] = SCALES
    options: tuple[str, ...] = ()  # RunOptions fields beyond scale/seeds/steps/out that it reads
    # report rows (summary-like dicts) from the results root, for an experiment whose results are not a
    # results/<name>-<scale>/summary.json (the benchmark); None: those summary.json files
    report_rows: Callable[[Path], list[dict]] | None = None
    results_dir: Callable[[RunOptions], Path] | None = None  # default results/<name>-<scale>


class ResultsLog:
    """metrics.jsonl of a results directory: one JSON record per line, flushed as written."""

    def __init__(self, out: str | Path):
        Path(out).mkdir(parents=True, exist_ok=True)
        self._f = open(Path(out) / "metrics.jsonl", "w")

    def log(self, rec: dict) -> None:
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def write_summary(out: str | Path, summary: dict) -> None:
    """summary.json, written atomically, after checking the verdict against the vocabulary."""
    check_verdict(summary["verdict"])
    write_text_atomic(Path(out) / "summary.json", json.dumps(summary, indent=2) + "\n")


def fmt(x, spec: str = ".4f", none: str = "—") -> str:
    return none if x is None else format(x, spec)
