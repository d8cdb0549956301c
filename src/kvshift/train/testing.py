"""Helpers for testing the training pipeline (used by tests/train and CI; not needed for training).

Python + torch start in ~5 s on a small CI machine, too slow to restart a training process 20+
times. `fork_context()` gives a multiprocessing "forkserver" context whose server has imported
torch and the trainer once; every child is then a fork of it (milliseconds), a real separate
process that can be SIGKILLed. The worker functions live here (an importable module) so the
forkserver can find them.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kvshift.train import checkpoint as C
from kvshift.train import distributed as D
from kvshift.train.config import load_config
from kvshift.train.data import zipf_cdf
from kvshift.train.metrics import read_metrics
from kvshift.train.trainer import train

__all__ = ["fork_context", "write_tiny_shards", "free_port", "train_worker", "dist_worker", "losses"]

_PRELOAD = ["kvshift.train.testing", "kvshift.train.trainer", "kvshift.train.checkpoint", "kvshift.train.data",
            "kvshift.models", "safetensors.torch", "tqdm", "torch.distributed.checkpoint.state_dict",
            "torch._inductor"]  # torch.use_deterministic_algorithms imports it (2 s)


def fork_context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tiny_shards(out: str | Path, *, vocab_size: int = 97, train_docs: int = 300, val_docs: int = 40,
                      seed: int = 0, domains: tuple[str, ...] = ("prose", "code"), bytes_per_token: float = 3.5) -> Path:
    """A shard directory in the kvshift-shards-v1 layout (see kvshift.data.shards) with Zipf-distributed
    documents of two domains, and byte counts in meta.json so bits/byte can be reported."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    eos = 0

    cdf = zipf_cdf(vocab_size)
    meta = {"format": "kvshift-shards-v1", "tokenizer_sha256": "0" * 64, "tokenizer_file": "none",
            "vocab_size": vocab_size, "eos_id": eos, "dtype": "uint16", "domains": list(domains), "splits": {}}
    for split, n_docs in (("train", train_docs), ("val", val_docs)):
        toks, offsets, doms = [], [], []
        n = 0
        for _ in range(n_docs):  # (python loop: ~100k documents/s)
            d = int(rng.integers(len(domains)))
            length = int(rng.integers(5, 60))
            if d == 0:
                body = 1 + np.searchsorted(cdf, rng.random(length), side="right")
            else:
                pat = 1 + np.searchsorted(cdf, rng.random(int(rng.integers(2, 7))), side="right")
                body = np.resize(pat, length)
            offsets.append(n)
            doms.append(d)
            toks.append(np.concatenate([[eos], body]))
            n += 1 + length
        toks.append(np.array([eos]))
        toks = np.concatenate(toks)
        offsets.append(n)
        files = {"tokens": f"{split}.tokens.bin", "offsets": f"{split}.offsets.bin", "domains": f"{split}.domains.bin"}
        np.asarray(toks, dtype=np.uint16).tofile(out / files["tokens"])
        np.asarray(offsets, dtype=np.int64).tofile(out / files["offsets"])
        np.asarray(doms, dtype=np.uint8).tofile(out / files["domains"])
        tok_by_dom = {name: 0 for name in domains}
        for i, d in enumerate(doms):
            tok_by_dom[domains[d]] += offsets[i + 1] - offsets[i]
        meta["splits"][split] = {
            "tokens": len(toks), "documents": n_docs, "files": files,
            "bytes": int(len(toks) * bytes_per_token), "tokens_by_domain": tok_by_dom,
            "bytes_by_domain": {k: int(v * bytes_per_token) for k, v in tok_by_dom.items()}}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


def losses(run_dir: str | Path) -> list[float]:

    return [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]


def train_worker(config: str, overrides: list[str], out: str, resume: bool, log_file: str,
                 ckpt_delay_s: float = 0.0) -> None:
    """Child process: one training launch, log lines to `log_file`. `ckpt_delay_s` stretches every
    checkpoint file write (so a random SIGKILL often lands mid-write)."""
    torch.set_num_threads(1)

    if ckpt_delay_s:
        orig = C.write_atomic

        def slow(path, write):
            def w(f):
                write(f)
                f.flush()
                time.sleep(ckpt_delay_s)  # a half-written temp file exists during this sleep
            orig(path, w)
        C.write_atomic = slow
    with open(log_file, "a", buffering=1) as lf:
        train(load_config(config, overrides), out, resume=resume, log=lambda s: lf.write(s + "\n"))
    sys.stdout.flush()


def dist_worker(rank: int, world_size: int, port: int, config: str, overrides: list[str], out: str,
                fsdp: bool, resume: bool = False) -> None:
    """Child process: rank `rank` of a gloo process group on 127.0.0.1 (what torchrun would set up)."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    try:
        train(load_config(config, overrides), out, resume=resume, fsdp=fsdp, log=lambda s: None)
    finally:
        D.teardown()
