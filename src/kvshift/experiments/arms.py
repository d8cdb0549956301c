"""Arms of a synthetic-task experiment, trained by the one trainer (`kvshift.train.trainer.train`).

Fairness: every arm of a seed trains on one shared `DataStream` (batches are a pure function of
(data seed, step), generated once), from the same shared initial weights (`LM(config, seed)` does not
depend on the attention kind), with the same steps, batch, optimiser and schedule. Each arm is a
trainer run in the scratch directory (`RunOptions.runs`), with the task's batches as a custom batch
source and the task's held-out metric as the trainer's evaluator; the experiment then collects the
runs' records into its results directory.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from kvshift.models import ModelConfig
from kvshift.train.checkpoint import list_checkpoints
from kvshift.train.config import DataConfig, OptimConfig, RunConfig, TrainSection
from kvshift.train.metrics import read_metrics
from kvshift.train.resume import start_plan
from kvshift.train.trainer import train
from kvshift.utils.io import write_json_atomic

__all__ = ["ArmInterrupted", "Arm", "target_accuracy", "masked_accuracy", "DataStream", "StreamSource", "TrainSpec",
           "next_token_batch", "train_arm", "THRESHOLDS", "steps_to", "EVAL_SEED", "default_device", "fingerprint"]

THRESHOLDS = (0.5, 0.9, 0.99)
EVAL_SEED = 999_983  # held-out rows: a seed no training stream uses
Sampler = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]  # (batch, gen) -> tokens, aux


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _worker_init():
    torch.set_num_threads(1)  # many workers: one thread each


def _make_chunk(args):
    sampler, batch, steps, seed = args
    g = torch.Generator().manual_seed(seed)
    toks, auxs = [], []
    for _ in range(steps):
        t, a = sampler(batch, g)
        toks.append(t.to(torch.int32))
        auxs.append(a)
    return torch.stack(toks), torch.stack(auxs)


class DataStream:
    """Batches for steps 0..n-1; batch(step) is a pure function of (seed, step). Chunks of steps are
    generated in parallel processes (seeded per chunk) and kept in memory for every arm."""

    CHUNK = 25

    def __init__(self, sampler: Sampler, batch_size: int, steps: int, seed: int, workers: int | None = None):
        self.sampler, self.batch_size, self.steps, self.seed = sampler, batch_size, steps, seed
        n_chunks = math.ceil(steps / self.CHUNK)
        jobs = [(sampler, batch_size, min(self.CHUNK, steps - i * self.CHUNK), seed * 100_003 + i)
                for i in range(n_chunks)]
        workers = workers if workers is not None else min(len(jobs), max(1, (os.cpu_count() or 1) - 1), 16)
        t0 = time.time()
        if workers > 1 and len(jobs) > 1:
            # spawn, not fork: a forked child of a process whose OpenMP pool is running can hang
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as ex:
                chunks = list(ex.map(_make_chunk, jobs))
        else:
            chunks = [_make_chunk(j) for j in jobs]
        self.tokens = torch.cat([c[0] for c in chunks])  # (steps, B, T)
        self.mask = torch.cat([c[1] for c in chunks])  # (steps, B, T): the task's second tensor
        self.gen_seconds = time.time() - t0

    def batch(self, step: int):
        return self.tokens[step], self.mask[step]


def next_token_batch(tokens: torch.Tensor, _aux: torch.Tensor) -> dict:
    """Rows of T + 1 tokens -> the trainer's batch: read T, predict the next token at every position."""
    tokens = tokens.long()
    x = tokens[:, :-1].contiguous()
    return {"input_ids": x, "labels": tokens[:, 1:].contiguous(), "position_ids": torch.arange(x.shape[1]).expand_as(x)}


class StreamSource:
    """The trainer's batch source over a DataStream: batch(step) -> input_ids, labels, position_ids."""

    def __init__(self, stream: DataStream, to_batch: Callable[[torch.Tensor, torch.Tensor], dict] = next_token_batch):
        self.stream, self.to_batch = stream, to_batch

    def batch(self, step: int) -> dict:
        return self.to_batch(*self.stream.batch(step))


@dataclass
class TrainSpec:
    steps: int
    batch_size: int
    lr: float = 2e-4
    warmup: int = 1000
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100
    log_every: int = 10
    compile: bool = False
    bf16: bool = False
    coefficients_every: int = 0  # every shift coefficient in the records every N steps
    threads: int | None = None  # CPU threads of the training process (restored afterwards)
    # a checkpoint every N steps (0: only the final one and one at a SIGTERM), so that an arm cut by a time
    # limit resumes on a rerun. None: every eighth of the run, at least 50 steps apart (250 of a 2,000-step
    # GPU arm): a checkpoint of these models (weights + AdamW moments, keep_last 1) takes well under a second,
    # and the trainer's own checkpoint at the SIGTERM already covers the usual cut; the periodic ones cover a
    # SIGKILL (experiment.sh's `timeout -k 30`, the device's per-command limit). Tiny test arms (< 50 steps)
    # thus write only the final one.
    ckpt_every: int | None = None

    def checkpoint_interval(self) -> int:
        if self.ckpt_every is not None:
            return self.ckpt_every
        every = max(50, -(-self.steps // 8))
        return every if every < self.steps else 0

    def to_dict(self) -> dict:
        """The training setting that published runs record and compare (`toy_runs.check_same_setting`): the
        checkpoint interval changes no result and is left out, so runs published before it existed still match."""
        d = asdict(self)
        del d["ckpt_every"]
        return d


@dataclass
class Arm:
    name: str
    config: ModelConfig
    extra: dict = field(default_factory=dict)


def masked_accuracy(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """Prediction at position p of token p+1, counted where mask[p] (last position never counts)."""
    pred = logits[:, :-1].argmax(-1)
    m = mask[:, :-1]
    return int((pred == tokens[:, 1:])[m].sum()), int(m.sum())


def target_accuracy(tokens: torch.Tensor, mask: torch.Tensor, device, model, batch: int = 64) -> dict:
    """The evaluator of every toy task: accuracy and loss at the task's target positions of held-out rows."""
    correct = total = 0
    loss_sum = n = 0.0
    for i in range(0, tokens.shape[0], batch):
        t = tokens[i:i + batch].to(device).long()
        m = mask[i:i + batch].to(device)
        logits = model(t)
        c, k = masked_accuracy(logits, t, m)
        correct += c
        total += k
        lt = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1),
                             reduction="none")
        tm = m[:, :-1].reshape(-1)
        loss_sum += float(lt[tm].sum())
        n += int(tm.sum())
    return {"accuracy": correct / max(total, 1), "target_loss": loss_sum / max(n, 1), "targets": total}


def run_config(spec: TrainSpec, model: ModelConfig, seq_len: int, seed: int, device: torch.device) -> RunConfig:
    """The trainer's config of one arm: the task's batches come from the caller (data.kind = "custom"); only a
    non-finite loss counts as divergence; a checkpoint every `spec.checkpoint_interval()` steps (and the final one)."""
    return RunConfig(
        model=model.to_dict(),
        data=DataConfig(kind="custom", seq_len=seq_len, batch_size=spec.batch_size),
        optim=OptimConfig(lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay, warmup=spec.warmup,
                          clip=spec.grad_clip),
        train=TrainSection(steps=spec.steps, eval_every=spec.eval_every, eval_batches=0,
                           ckpt_every=spec.checkpoint_interval(), keep_last=1,
                           seed=seed, compile=spec.compile, dtype="bf16" if spec.bf16 else "fp32",
                           device=device.type, threads=spec.threads, log_every=spec.log_every, progress=False,
                           diverge_factor=0.0, shift_stats=False, coefficients_every=spec.coefficients_every,
                           eval_at_start=True))


def steps_to(evals: list[dict], key: str = "accuracy") -> dict[str, int | None]:
    """The first evaluated step at which `key` reached each threshold (None: never)."""
    out: dict[str, int | None] = {str(t): None for t in THRESHOLDS}
    for r in evals:
        for t in THRESHOLDS:
            if out[str(t)] is None and r[key] >= t:
                out[str(t)] = r["step"]
    return out


class ArmInterrupted(RuntimeError):
    """An arm's training was stopped by a signal before its last step."""


def fingerprint(obj) -> str:
    """A digest of what an arm trains on and is judged by (batches, evaluator): tensors by their bytes, plain values
    by repr, containers and functools.partial recursively, functions by name, any other object by its type only
    (a repr may hold a memory address, which would never match)."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif x is None or isinstance(x, (str, int, float, bool, torch.device, torch.dtype)):
            h.update(f"V{x!r}".encode())
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=str):
                feed(str(k))
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):  # e.g. iGSM problems: by their fields
            h.update(f"D{type(x).__qualname__}".encode())
            feed(dataclasses.asdict(x))
        elif isinstance(x, functools.partial):
            feed((x.func, x.args, x.keywords))
        elif callable(x) and hasattr(x, "__qualname__"):
            h.update(f"F{getattr(x, '__module__', '')}.{x.__qualname__}".encode())
        else:
            h.update(f"O{type(x).__qualname__}".encode())

    feed(obj)
    return h.hexdigest()


RESUME_KEY = "arm.json"  # in the run directory: what a rerun must match to resume the arm


def _resume_step(run_dir: Path, key: dict, cfg: RunConfig, steps: int) -> tuple[int | None, str]:
    """(the step a rerun resumes from, or None: start afresh; why, for the log). Resumes only a run of the same key
    (config, batches, evaluator) that holds a verifying checkpoint before its last step; a finished run (kept with
    keep_model) is trained again, as before checkpoints were resumed."""
    if not run_dir.exists():
        return None, "new run"
    try:
        stored = json.loads((run_dir / RESUME_KEY).read_text())
    except (OSError, ValueError):
        return None, f"no readable {RESUME_KEY}"
    if stored != json.loads(json.dumps(key)):
        return None, "another configuration, data or evaluator"
    plan = start_plan(run_dir, cfg, resume=True)
    if plan["error"] or plan["ckpt"] is None:
        return None, plan["error"] or "no checkpoint"
    step = int(Path(plan["ckpt"]).name.split("_")[1])
    return (step, f"checkpoint at step {step}") if 0 < step < steps else (None, f"checkpoint at step {step} of {steps}")


def train_arm(name: str, model: ModelConfig, source, spec: TrainSpec, *, seq_len: int, seed: int, evaluator,
              run_dir: Path, device: torch.device, keep_model: bool = False, log=print) -> dict:
    """Trains one arm through the trainer in `run_dir` and returns its records: {"summary": the trainer's summary,
    "records": metrics.jsonl}. A run directory left by an interrupted launch of the same arm (same run config,
    batches and evaluator: run_dir/arm.json) is resumed from its last checkpoint, which reproduces the
    uninterrupted run's records (the batch source is step-indexed); any other run directory is replaced. Without
    `keep_model` the checkpoints are deleted afterwards (run_dir/checkpoints holds the final weights otherwise)."""
    run_dir = Path(run_dir)
    cfg = run_config(spec, model, seq_len, seed, device)
    key = {"arm": name, "config": cfg.to_dict(), "evaluator": fingerprint(evaluator),
           "batches": fingerprint([source.batch(0), source.batch(spec.steps - 1)])}
    start, why = _resume_step(run_dir, key, cfg, spec.steps)
    if start is None:
        if run_dir.exists():
            log(f"[{name}] seed {seed}: replacing {run_dir} ({why})")
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        write_json_atomic(run_dir / RESUME_KEY, key)
    else:
        log(f"[{name}] seed {seed}: resuming {run_dir} from step {start} of {spec.steps}")
    threads = torch.get_num_threads()
    t0 = time.time()
    try:
        s = train(cfg, run_dir, resume=start is not None, sources=[source], evaluator=evaluator,
                  command=f"arm {name} seed {seed}", log=lambda m: None)
    finally:
        torch.set_num_threads(threads)  # train.threads sets the process-wide count
    log(f"[{name}] seed {seed}: {s['status']} after {s['steps']} steps in {time.time() - t0:.0f} s"
        + (f" (resumed at step {start})" if start is not None else ""))
    if s["status"] == "interrupted":  # a SIGTERM (a time limit): nothing of this arm may be published yet
        ck = list_checkpoints(run_dir / "checkpoints")
        nxt = f"resumes it from step {int(ck[-1].name.split('_')[1])}" if ck else "starts it again (no checkpoint)"
        raise ArmInterrupted(f"{name} seed {seed} was interrupted at step {s['steps']} of {spec.steps}; its run stays "
                             f"in {run_dir}: the next identical command {nxt} (on a machine that still holds that "
                             f"directory; elsewhere the arm starts again)")
    if not keep_model:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {"summary": s, "records": read_metrics(run_dir / "metrics.jsonl")}
