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

Files are numpy .npz: requests hold unique contexts and continuations as token arrays (hellaswag's four
endings share one context) plus a JSON `meta`; scores hold `logprob` (float64), `greedy` (bool) and a
`meta` naming the model, its weights' sha256, the device and the requests' sha256.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from kvshift.utils.io import file_sha256
from kvshift.utils.io import write_atomic

_FORMAT = "kvshift-eval-requests-1"
_SCORES_FORMAT = "kvshift-eval-scores-1"


def _concat(seqs: list[tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray]:
    off = np.zeros(len(seqs) + 1, dtype=np.int64)
    off[1:] = np.cumsum([len(s) for s in seqs])
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(off[-1]))
    return flat, off


class Requests:
    """Unique (context, continuation) token pairs; `key(i)` is request i as lm-eval tokenized it."""

    def __init__(self, ctx: np.ndarray, ctx_off: np.ndarray, cont: np.ndarray, cont_off: np.ndarray,
                 req_ctx: np.ndarray, meta: dict):
        self.ctx, self.ctx_off, self.cont, self.cont_off, self.req_ctx, self.meta = ctx, ctx_off, cont, cont_off, \
            req_ctx, meta

    def __len__(self) -> int:
        return len(self.req_ctx)

    def context(self, i: int) -> list[int]:
        c = int(self.req_ctx[i])
        return self.ctx[self.ctx_off[c]:self.ctx_off[c + 1]].tolist()

    def continuation(self, i: int) -> list[int]:
        return self.cont[self.cont_off[i]:self.cont_off[i + 1]].tolist()

    def key(self, i: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(self.context(i)), tuple(self.continuation(i))

    @classmethod
    def from_pairs(cls, pairs: list[tuple[tuple[int, ...], tuple[int, ...]]], meta: dict) -> "Requests":
        contexts: dict[tuple[int, ...], int] = {}
        req_ctx = [contexts.setdefault(c, len(contexts)) for c, _ in pairs]
        ctx, ctx_off = _concat(list(contexts))
        cont, cont_off = _concat([k for _, k in pairs])
        return cls(ctx, ctx_off, cont, cont_off, np.asarray(req_ctx, dtype=np.int64), meta)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        small = max(int(self.ctx.max(initial=0)), int(self.cont.max(initial=0))) < 2 ** 16
        tok = np.uint16 if small else np.int32
        write_atomic(path, lambda f: np.savez_compressed(
            f, ctx=self.ctx.astype(tok), ctx_off=self.ctx_off, cont=self.cont.astype(tok), cont_off=self.cont_off,
            req_ctx=self.req_ctx.astype(np.int32), meta=np.array(json.dumps(self.meta))))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Requests":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"requests {path}: no such file")
        try:
            z = np.load(path, allow_pickle=False)
            meta = json.loads(str(z["meta"]))
            arrays = [z[k].astype(np.int64) for k in ("ctx", "ctx_off", "cont", "cont_off", "req_ctx")]
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"requests {path}: not a requests file written by `kvshift eval --record` ({e})") from None
        if meta.get("format") != _FORMAT:
            raise ValueError(f"requests {path}: format {meta.get('format')!r}, expected {_FORMAT!r}")
        return cls(*arrays, meta)


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
    import torch

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
    from kvshift.eval.harness import _is_training_dir

    if not model.is_dir():
        return {}
    src = model
    if _is_training_dir(model):
        from kvshift.hf.convert import _resolve_checkpoint

        src = _resolve_checkpoint(model)
    return {str(p.relative_to(model)): file_sha256(p) for p in sorted(src.glob("*.safetensors"))}


def score_file(model: str | Path, requests: str | Path, out: str | Path, *, device: str | None = None,
               dtype: str | None = None, batch_tokens: int = 1 << 16) -> dict:
    """Score `requests` with `model`; writes `out` (.npz) and returns its meta."""
    import platform

    import torch

    from kvshift.eval.harness import load_weights

    req = Requests.load(requests)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    hf = load_weights(model, device=device, dtype=dtype)  # an exported directory or a training run
    t0 = time.time()
    logprob, greedy = score(hf, req, batch_tokens=batch_tokens, device=device)
    meta = {"format": _SCORES_FORMAT, "model": str(model), "weights_sha256": _weights_sha256(Path(model)),
            "model_type": getattr(getattr(hf, "config", None), "model_type", None),
            "dtype": str(next(hf.parameters()).dtype), "device": str(device),
            "device_name": torch.cuda.get_device_name(0) if str(device).startswith("cuda") else platform.machine(),
            "torch": torch.__version__, "requests_sha256": file_sha256(Path(requests)), "n_requests": len(req),
            "max_length": req.meta["max_length"], "score_seconds": round(time.time() - t0, 2)}
    from kvshift.utils.provenance import git_commit

    meta["git_commit"] = git_commit()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: np.savez(f, logprob=logprob, greedy=greedy, meta=np.array(json.dumps(meta))))
    return meta


def load_scores(path: str | Path, requests: Requests, requests_path: str | Path) -> dict:
    """{(context, continuation): (logprob, greedy)} after checking the scores belong to these requests."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"scores {path}: no such file")
    z = np.load(path, allow_pickle=False)
    meta = json.loads(str(z["meta"]))
    if meta.get("format") != _SCORES_FORMAT:
        raise ValueError(f"scores {path}: format {meta.get('format')!r}, expected {_SCORES_FORMAT!r}")
    if meta["requests_sha256"] != file_sha256(Path(requests_path)):
        raise ValueError(f"scores {path} were computed for other requests than {requests_path} (sha256 differs)")
    lp, gr = z["logprob"], z["greedy"]
    if len(lp) != len(requests):
        raise ValueError(f"scores {path}: {len(lp)} scores for {len(requests)} requests")
    return {"meta": meta, "table": {requests.key(i): (float(lp[i]), bool(gr[i])) for i in range(len(requests))}}


# ---- steps 1 and 3: lm-eval with a recording / replaying HFLM ------------------------------------
def offload_lm(base_cls, mode: str, table: dict | None = None):
    """A subclass of lm-eval's HFLM (base_cls) whose loglikelihoods are recorded or replayed."""

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


__all__ = ["Requests", "score", "score_file", "load_scores", "offload_lm"]
