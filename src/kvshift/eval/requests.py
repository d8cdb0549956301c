"""The two files of an offloaded evaluation (kvshift.eval.offload): recorded requests and their scores.

Both are numpy .npz files. Requests hold unique contexts and continuations as token arrays (hellaswag's
four endings share one context) plus a JSON `meta` (format REQUESTS_FORMAT, tasks, limit, max_length,
tokenizer sha256, ...). Scores hold `logprob` (float64), `greedy` (bool) and a JSON `meta` (format
SCORES_FORMAT) naming the model, its weights' sha256, the device and the requests file's sha256.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvshift.utils.io import file_sha256, write_atomic

__all__ = ["REQUESTS_FORMAT", "SCORES_FORMAT", "Requests", "save_scores", "load_scores"]

REQUESTS_FORMAT = "kvshift-eval-requests-1"
SCORES_FORMAT = "kvshift-eval-scores-1"


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
        if meta.get("format") != REQUESTS_FORMAT:
            raise ValueError(f"requests {path}: format {meta.get('format')!r}, expected {REQUESTS_FORMAT!r}")
        return cls(*arrays, meta)


def save_scores(path: str | Path, logprob: np.ndarray, greedy: np.ndarray, meta: dict) -> dict:
    """Write a scores file; returns its meta: `meta` after {"format": SCORES_FORMAT}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": SCORES_FORMAT, **meta}
    write_atomic(path, lambda f: np.savez(f, logprob=logprob, greedy=greedy, meta=np.array(json.dumps(meta))))
    return meta


def load_scores(path: str | Path, requests: Requests, requests_path: str | Path) -> dict:
    """{"meta": the scores' meta, "table": {(context, continuation): (logprob, greedy)}} after checking
    the scores belong to these requests."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"scores {path}: no such file")
    z = np.load(path, allow_pickle=False)
    meta = json.loads(str(z["meta"]))
    if meta.get("format") != SCORES_FORMAT:
        raise ValueError(f"scores {path}: format {meta.get('format')!r}, expected {SCORES_FORMAT!r}")
    if meta["requests_sha256"] != file_sha256(Path(requests_path)):
        raise ValueError(f"scores {path} were computed for other requests than {requests_path} (sha256 differs)")
    lp, gr = z["logprob"], z["greedy"]
    if len(lp) != len(requests):
        raise ValueError(f"scores {path}: {len(lp)} scores for {len(requests)} requests")
    return {"meta": meta, "table": {requests.key(i): (float(lp[i]), bool(gr[i])) for i in range(len(requests))}}
