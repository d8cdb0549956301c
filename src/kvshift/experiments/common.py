"""Shared machinery of the toy experiments: provenance, a fair multi-arm training loop on a synthetic
task, and the results directory (metrics.jsonl, summary.json, plot.png, README.md).

Fairness: every arm of an experiment trains on the same data stream (batches are a pure function of
(data_seed, step), generated once and shared), with the same steps, batch, optimiser and schedule;
shared weights start equal (kvshift.LM's init does not depend on the attention kind).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from kvshift.models import LM, ModelConfig
from kvshift.utils.provenance import git_commit

THRESHOLDS = (0.5, 0.9, 0.99)


# ---------------------------------------------------------------------------------------------
# provenance
def provenance() -> dict:
    import kvshift
    return {
        "command": " ".join(["kvshift"] + sys.argv[1:]) if sys.argv and sys.argv[0].endswith(("kvshift", "cli.py"))
        else " ".join(sys.argv),
        "git_commit": git_commit(),
        "kvshift": kvshift.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------
# data: a deterministic stream of (tokens, mask) batches, shared by every arm
Sampler = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]  # (batch, gen) -> tokens, mask


def _worker_init():
    torch.set_num_threads(1)  # many workers: one thread each


def _make_chunk(args):
    sampler, batch, steps, seed = args
    g = torch.Generator().manual_seed(seed)
    toks, masks = [], []
    for _ in range(steps):
        t, m = sampler(batch, g)
        toks.append(t.to(torch.int32))
        masks.append(m)
    return torch.stack(toks), torch.stack(masks)


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
        self.mask = torch.cat([c[1] for c in chunks])
        self.gen_seconds = time.time() - t0

    def batch(self, step: int):
        return self.tokens[step], self.mask[step]


# ---------------------------------------------------------------------------------------------
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
    log_coefficients: bool = False
    coef_every: int = 0  # 0: with each eval


@dataclass
class Arm:
    name: str
    config: ModelConfig
    extra: dict = field(default_factory=dict)


def warmup_constant(warmup: int):
    return lambda step: min(1.0, (step + 1) / max(1, warmup))


def optimizer_step(model, opt, sched, loss: torch.Tensor, grad_clip: float) -> torch.Tensor:
    """Backward, clip, step, schedule; returns the gradient norm before clipping."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()
    return gnorm


def masked_accuracy(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """Prediction at position p of token p+1, counted where mask[p] (last position never counts)."""
    pred = logits[:, :-1].argmax(-1)
    m = mask[:, :-1]
    return int((pred == tokens[:, 1:])[m].sum()), int(m.sum())


@torch.no_grad()
def evaluate(model: LM, tokens: torch.Tensor, mask: torch.Tensor, device, bf16: bool, batch: int = 64) -> dict:
    model.eval()
    correct = total = 0
    loss_sum = n = 0.0
    for i in range(0, tokens.shape[0], batch):
        t = tokens[i:i + batch].to(device).long()
        m = mask[i:i + batch].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(t)
        c, k = masked_accuracy(logits, t, m)
        correct += c
        total += k
        lt = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1), reduction="none")
        tm = m[:, :-1].reshape(-1)
        loss_sum += float(lt[tm].sum())
        n += int(tm.sum())
    model.train()
    return {"accuracy": correct / max(total, 1), "target_loss": loss_sum / max(n, 1), "targets": total}


def coefficient_record(model: LM) -> list[dict]:
    """Per layer: alpha, beta (n_kv_heads, window+1) current-first, as lists."""
    return [{"alpha": a.tolist(), "beta": b.tolist()} for a, b in model.shift_coefficients()]


def save_model(model: LM, directory: str | Path) -> None:
    """model.safetensors + model_config.json: loadable by `kvshift analyze` / `kvshift export`."""
    from safetensors.torch import save_file
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("output.weight", None)  # the same tensor as tok_embeddings.weight
    save_file(state, str(d / "model.safetensors"))
    (d / "model_config.json").write_text(json.dumps(model.config.to_dict(), indent=2))


def train_arm(arm: Arm, stream: DataStream, eval_set: tuple[torch.Tensor, torch.Tensor], spec: TrainSpec, *,
              init_seed: int, device: torch.device, log: Callable[[dict], None], progress: bool = True,
              save_dir: str | Path | None = None) -> dict:
    """Train one arm on the shared stream; log dicts through `log`; return the arm's summary. With
    `save_dir`, the final weights are saved there (git-ignored: results/*/models/)."""
    model = LM(arm.config, seed=init_seed).to(device)
    opt_kw = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.param_groups(spec.weight_decay), lr=spec.lr, betas=spec.betas, **opt_kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_constant(spec.warmup))
    fwd = torch.compile(model) if spec.compile else model
    evals: list[dict] = []
    reached = {str(t): None for t in THRESHOLDS}
    t0 = time.time()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=spec.steps, desc=f"{arm.name}", dynamic_ncols=True, leave=True, mininterval=1.0)
    running, running_n = 0.0, 0
    V = arm.config.vocab_size
    diverged = None

    def do_eval(step):
        r = evaluate(model, eval_set[0], eval_set[1], device, spec.bf16)
        rec = {"step": step, "arm": arm.name, "eval": True, "accuracy": r["accuracy"], "target_loss": r["target_loss"],
               "elapsed": time.time() - t0}
        if spec.log_coefficients and arm.config.shifted:
            rec["coefficients"] = coefficient_record(model)
        evals.append(rec)
        log(rec)
        for th in THRESHOLDS:
            if reached[str(th)] is None and r["accuracy"] >= th:
                reached[str(th)] = step
        return r

    model.train()
    for step in range(spec.steps):
        if step % spec.eval_every == 0:
            r = do_eval(step)
            if bar:
                bar.set_postfix(loss=f"{running / running_n:.3f}" if running_n else "-", acc=f"{r['accuracy']:.3f}")
        tok, _ = stream.batch(step)
        tok = tok.to(device, non_blocking=True).long()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.bf16):
            logits = fwd(tok[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, V), tok[:, 1:].reshape(-1))
        gnorm = optimizer_step(model, opt, sched, loss, spec.grad_clip)
        if (step + 1) % spec.log_every == 0 or step == spec.steps - 1:
            lv = float(loss.detach())
            if not math.isfinite(lv):
                diverged = step
            running += lv
            running_n += 1
            rec = {"step": step + 1, "arm": arm.name, "loss": lv, "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm)}
            if spec.log_coefficients and arm.config.shifted and spec.coef_every and (step + 1) % spec.coef_every == 0:
                rec["coefficients"] = coefficient_record(model)
            log(rec)
            if bar:
                bar.set_postfix(loss=f"{lv:.3f}", acc=f"{evals[-1]['accuracy']:.3f}" if evals else "-")
            if diverged is not None:
                break
        if bar:
            bar.update(1)
    final = do_eval(spec.steps if diverged is None else diverged + 1)
    if bar:
        bar.close()
    wall = time.time() - t0
    accs = [e["accuracy"] for e in evals]
    out = {
        "arm": arm.name,
        "model": arm.config.to_dict(),
        "non_embedding_params": model.num_params(),
        "final_accuracy": final["accuracy"],
        "best_accuracy": max(accs),
        "final_target_loss": final["target_loss"],
        "steps_to": reached,
        "wall_seconds": wall,
        "diverged_at": diverged,
        **arm.extra,
    }
    if arm.config.shifted:
        out["final_coefficients"] = coefficient_record(model)
    if save_dir is not None:
        save_model(model, save_dir)
    return out


# ---------------------------------------------------------------------------------------------
class ResultsDir:
    """results/<name>[-<scale>]/ with metrics.jsonl, summary.json, plot.png, README.md."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.path / "metrics.jsonl", "w")

    def log(self, rec: dict) -> None:
        self._metrics.write(json.dumps(rec) + "\n")
        self._metrics.flush()

    def close(self) -> None:
        self._metrics.close()


def write_summary(out: str | Path, summary: dict) -> None:
    """summary.json, written atomically."""
    tmp = Path(out) / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, Path(out) / "summary.json")


def read_metrics(path: str | Path) -> list[dict]:
    with open(Path(path) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def spec_dict(spec: TrainSpec) -> dict:
    return asdict(spec)
