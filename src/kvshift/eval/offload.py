"""Benchmarks whose loglikelihoods are computed on another machine, with lm-eval's task logic here.

A GPU machine may lack lm-evaluation-harness and the benchmark data, and a trained model may be too
large to copy back. The evaluation then splits into three steps; lm-eval does all the task logic
(prompts, tokenization, choices, metrics, standard errors) on this side:

    1. here:  kvshift eval SHELL --tasks ... --record requests.npz
              lm-eval runs with an HFLM whose `_loglikelihood_tokens` only records each (context tokens,
              continuation tokens) pair; nothing is computed. SHELL is any model directory with the
              tokenizer (and context length) of the model to be scored: the weights are not used.
    2. there: kvshift eval-score MODEL requests.npz --out scores.npz [--device cuda --dtype bfloat16]
              needs torch (and transformers for an exported directory) only: every request is scored
              exactly as HFLM does (inputs (context + continuation)[-(max_length+1):][:-1], right
              padding, log-softmax of the continuation positions, greedy match), in fp32 log-softmax.
    3. here:  kvshift eval SHELL --tasks ... --scores scores.npz --requests requests.npz
              the same lm-eval run again, `_loglikelihood_tokens` answering from the scores; a request
              that is not in the file (other tasks, limit or tokenizer) is an error, so the replay is
              the recorded evaluation or nothing.

Files (kvshift.eval.requests): requests hold unique contexts and continuations as token arrays plus a JSON
`meta`; scores hold `logprob` (float64), `greedy` (bool) and a `meta` naming the model, its weights' sha256,
the device and the requests' sha256. Steps 1 and 3 are `kvshift.eval.harness.run_eval(record=...)` and
`run_eval(scores=..., requests=...)` (lm-eval with `harness.offload_lm`); this module is step 2.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import torch

from kvshift.eval.harness import load_weights
from kvshift.eval.requests import Requests, save_scores
from kvshift.utils.io import file_sha256
from kvshift.utils.provenance import git_commit

__all__ = ["score", "score_file"]


# ---- step 2: scoring, torch only -----------------------------------------------------------------
def _order(req: Requests, max_length: int) -> list[tuple[int, list[int], int, int]]:
    """(index, input tokens, input length, continuation length) per request, longest first."""
    items = []
    for i in range(len(req)):
        ctx, cont = req.context(i), req.continuation(i)
        if not ctx or not cont:
            raise ValueError(f"request {i}: empty context or continuation")
        if len(cont) > max_length:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length {max_length}")
        inp = (ctx + cont)[-(max_length + 1):][:-1]
        items.append((i, inp, len(inp), len(cont)))
    items.sort(key=lambda t: -t[2])
    return items


def score(model, req: Requests, *, batch_tokens: int = 1 << 16, max_batch: int = 256,
          device=None) -> tuple[np.ndarray, np.ndarray]:
    """(logprob float64, greedy bool) per request, for a causal LM `model` (a transformers model or any
    module mapping (B, T) token ids to logits or an object with .logits)."""
    max_length = int(req.meta["max_length"])
    device = device or next(model.parameters()).device
    logprob = np.zeros(len(req), dtype=np.float64)
    greedy = np.zeros(len(req), dtype=bool)
    items = _order(req, max_length)
    k = 0
    with torch.inference_mode():
        while k < len(items):
            width = items[k][2]  # longest first: the batch's padded length
            n = max(1, min(max_batch, batch_tokens // width, len(items) - k))
            chunk = items[k:k + n]
            ids = torch.zeros((n, width), dtype=torch.long)
            for r, (_, inp, inplen, _) in enumerate(chunk):
                ids[r, :inplen] = torch.tensor(inp)
            out = model(ids.to(device))
            logits = out.logits if hasattr(out, "logits") else out
            for r, (i, inp, inplen, contlen) in enumerate(chunk):
                lp = logits[r, inplen - contlen:inplen].float().log_softmax(-1)
                target = torch.tensor(req.continuation(i), device=lp.device)
                logprob[i] = lp.gather(1, target[:, None]).sum().item()
                greedy[i] = bool((lp.argmax(-1) == target).all())
            k += n
    return logprob, greedy


def _weights_sha256(model: Path) -> dict:
    """{weights file (relative to model): sha256} of what was scored: the resolved checkpoint of a run."""
    from kvshift.hf import resolve_model_dir  # kvshift.hf needs transformers (the hf extra), as load_weights does

    if not model.is_dir():
        return {}
    _, src = resolve_model_dir(model)
    return {str(p.relative_to(model)): file_sha256(p) for p in sorted(src.glob("*.safetensors"))}


def score_file(model: str | Path, requests: str | Path, out: str | Path, *, device: str | None = None,
               dtype: str | None = None, batch_tokens: int = 1 << 16) -> dict:
    """Score `requests` with `model`; writes `out` (.npz) and returns its meta."""
    req = Requests.load(requests)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    hf = load_weights(model, device=device, dtype=dtype)  # an exported directory or a training run
    t0 = time.time()
    logprob, greedy = score(hf, req, batch_tokens=batch_tokens, device=device)
    meta = {"model": str(model), "weights_sha256": _weights_sha256(Path(model)),
            "model_type": getattr(getattr(hf, "config", None), "model_type", None),
            "dtype": str(next(hf.parameters()).dtype), "device": str(device),
            "device_name": torch.cuda.get_device_name(0) if str(device).startswith("cuda") else platform.machine(),
            "torch": torch.__version__, "requests_sha256": file_sha256(Path(requests)), "n_requests": len(req),
            "max_length": req.meta["max_length"], "score_seconds": round(time.time() - t0, 2),
            "git_commit": git_commit()}
    return save_scores(out, logprob, greedy, meta)
