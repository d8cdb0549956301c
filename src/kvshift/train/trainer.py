"""The training loop: one code path for CPU, one GPU, DDP and FSDP2.

    summary = train(cfg, out_dir, resume=True)

Run directory:
    config.json      the resolved RunConfig (+ the model config it expands to)
    command.txt      the command line of each launch (appended on resume)
    metrics.jsonl    per logged step: step, tokens, loss, lr, grad_norm, tokens_per_s, epoch; at eval
                     steps also val_loss, val_bpb, val_loss/<domain>, shift (coefficient summary)
    checkpoints/     see kvshift.train.checkpoint
    summary.json     written at the end (finished, diverged or interrupted)

Exit statuses (what `kvshift train` returns): 0 finished, 3 diverged (no checkpoint of the diverged
state is written; the last good one stays), 75 (EX_TEMPFAIL) interrupted by SIGTERM/SIGINT after a
checkpoint was written: rerun with --resume. A launch that kvshift.train.resume refuses (a changed
config on --resume, no verifying checkpoint, orphaned metrics) raises UserError before anything in
the run directory is written: exit 2 from the CLI. docs/reliability.md lists every case.

Determinism: the data batch of a step is a pure function of (data.seed, step); the model init a
pure function of train.seed; the optimizer, schedule position, RNG states and divergence tracker are
in the checkpoint. On CPU with a fixed thread count, a resumed run reproduces the uninterrupted
run's losses bit for bit (tests/train/test_train.py::test_resume_is_bit_exact, test_kill.py).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from kvshift.errors import UserError
from kvshift.models import LM
from kvshift.train import distributed as D
from kvshift.train.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from kvshift.train.config import RunConfig
from kvshift.train.data import make_sources, make_validation
from kvshift.train.flops import flops_per_token
from kvshift.train.init import init_from
from kvshift.train.metrics import (
    MetricsLog,
    coefficients_record,
    environment,
    read_metrics,
    shift_summary,
)
from kvshift.train.optim import build_optimizer, lr_at, set_lr
from kvshift.train.resume import check_resumed_config, start_plan
from kvshift.train.signals import NoBar, StopFlag
from kvshift.utils import io as uio

__all__ = ["train", "evaluate", "EXIT_OK", "EXIT_DIVERGED", "EXIT_INTERRUPTED"]

EXIT_OK, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 3, 75
WARMUP_STEPS = 3  # per launch, left out of tokens/s and MFU (torch.compile, cuDNN/Triton autotuning)


def _autocast(device: torch.device, dtype: str):
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def _to(batch: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, val, device, autocast, vocab_size: int) -> dict:
    """Validation loss (nats/token) over the whole validation set, all ranks together; bits/byte when
    the set knows bytes per token; per-domain losses when it knows domains."""
    was_training = model.training
    model.eval()
    names = val.domain_names or []
    nd = max(1, len(names))
    sums = torch.zeros(2 + 2 * nd, dtype=torch.float64, device=device)  # total loss, tokens, per-domain pairs
    for b in val:
        b = _to(b, device)
        with autocast():
            logits = model(b["input_ids"], position_ids=b["position_ids"])  # (B, T, V)
        loss_BT = F.cross_entropy(logits.float().view(-1, vocab_size), b["labels"].view(-1), ignore_index=-100,
                                  reduction="none").view(b["labels"].shape)
        valid = b["labels"] != -100
        sums[0] += loss_BT[valid].double().sum()
        sums[1] += valid.sum()
        if names and "domain_ids" in b:
            onehot = F.one_hot(b["domain_ids"][valid], nd).double()  # (N, nd); index_add_ is nondeterministic on CUDA
            sums[2:2 + nd] += (onehot * loss_BT[valid].double().unsqueeze(1)).sum(0)
            sums[2 + nd:] += onehot.sum(0)
    D.all_reduce(sums)
    model.train(was_training)
    s = sums.cpu().tolist()
    out = {"val_loss": s[0] / max(s[1], 1.0), "val_tokens": int(s[1])}
    if val.bytes_per_token:
        out["val_bpb"] = out["val_loss"] / math.log(2) / val.bytes_per_token
    for i, name in enumerate(names):
        n = s[2 + nd + i]
        if n > 0:
            out[f"val_loss/{name}"] = s[2 + i] / n
            out[f"val_tokens/{name}"] = int(n)
            bpt = val.bytes_per_token_by_domain.get(name)
            if bpt:
                out[f"val_bpb/{name}"] = out[f"val_loss/{name}"] / math.log(2) / bpt
    return out


def _grad_norm(model, clip: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def train(cfg: RunConfig, out: str | Path, *, resume: bool = False, fsdp: bool = False,
          command: str | None = None, log=None, on_step=None, sources: list | None = None,
          evaluator=None) -> dict:
    """Trains (or resumes) one run into `out`; returns the summary dict (also in summary.json).
    summary["exit_code"] is one of EXIT_OK, EXIT_DIVERGED, EXIT_INTERRUPTED. `on_step(step, record)`
    is called after every completed optimizer step (benchmarks, tests).

    Every experiment trains through this function. With data.kind = "custom" the caller hands in
    `sources` (one BatchSource per micro-step: batch(step) -> input_ids, labels (-100: no loss),
    position_ids) instead of shards; `evaluator(model) -> dict` adds its metrics to every evaluation
    (eval mode, no grad, the run's autocast), e.g. the accuracy of a synthetic task on held-out rows."""
    t_start = time.time()
    tc, oc, dc = cfg.train, cfg.optim, cfg.data
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    d = D.setup(tc.device, fsdp)
    if d.device.type == "cuda":  # the peak below is this launch's, not that of an earlier run in this process
        torch.cuda.reset_peak_memory_stats(d.device)
    log = log or ((lambda s: print(s, file=sys.stderr, flush=True)) if d.is_main else (lambda s: None))
    out = Path(out)
    ckpt_root = out / "checkpoints"
    mcfg = cfg.model_config()
    # where this launch starts (kvshift.train.resume): checked, checkpoint loaded and its config compared
    # before anything in `out` is written; every rank refuses together
    plan = D.broadcast_object(start_plan(out, cfg, resume=resume) if d.is_main else None)
    if plan["error"]:
        raise UserError(plan["error"])
    for problem in plan["skipped"]:
        log(f"[train] skipping checkpoint: {problem}")
    ckpt = plan["ckpt"]
    if ckpt is not None:
        weights, st = load_checkpoint(ckpt, verify=False)  # start_plan verified it
        check_resumed_config(ckpt, st, cfg, mcfg, d.world_size)
        if oc.schedule == "cosine" and st.get("schedule", {}).get("steps", tc.steps) != tc.steps:
            log(f"[train] note: train.steps {st['schedule']['steps']} -> {tc.steps} stretches the cosine schedule "
                f"from step {st['step']} on")
    torch.manual_seed(tc.seed + d.rank)

    model = LM(mcfg, seed=tc.seed)  # identical shared init across arms (see LM.init_weights)
    init_info = {"path": tc.init_from, "restored_from_checkpoint": str(ckpt)} if tc.init_from else None
    if tc.init_from and ckpt is None:  # a resume restores its checkpoint instead
        init_info = init_from(model, tc.init_from)
        log(f"[train] initialised from {tc.init_from} ({init_info['identity_filled']} shift coefficients set "
            f"to the identity, {init_info['identity_dropped']} identity ones dropped)")
    model = model.to(d.device)
    wrapped = D.wrap_model(model, d)
    eval_model = model  # DDP: the inner module (no sync needed); FSDP: the sharded root
    compile_on = tc.compile if tc.compile is not None else d.device.type == "cuda"
    fwd = torch.compile(wrapped) if compile_on else wrapped
    opt = build_optimizer(model, oc, d.device)
    autocast = _autocast(d.device, tc.dtype)

    if dc.kind == "custom":
        if not sources or len(sources) != dc.grad_accum:
            raise ValueError(f"data.kind = 'custom' needs the caller's batch sources, one per micro-step "
                             f"(data.grad_accum = {dc.grad_accum})")
        val = None
    else:
        if sources is not None:
            raise ValueError(f"batch sources were passed but data.kind is {dc.kind!r}: set data.kind = 'custom'")
        sources = make_sources(dc, mcfg.vocab_size, d.rank, d.world_size)
        n_val = dc.val_windows or tc.eval_batches * dc.batch_size * d.world_size
        val = make_validation(dc, mcfg.vocab_size, n_val, d.rank, d.world_size) if tc.eval_batches else None
    evaluating = val is not None or evaluator is not None
    tokens_per_step = dc.batch_size * dc.seq_len * dc.grad_accum * d.world_size
    diverge_after = tc.diverge_after if tc.diverge_after is not None else oc.warmup
    if d.is_main:  # every check passed: from here on the run directory is written
        out.mkdir(parents=True, exist_ok=True)
        uio.write_json_atomic(out / "config.json", {**cfg.to_dict(), "model_config": mcfg.to_dict()})
        with open(out / "command.txt", "a") as f:
            f.write((command or " ".join(sys.argv)) + "\n")

    # ---- state that a checkpoint restores ----
    step, running_min, best = 0, float("inf"), {"val_loss": None, "step": None}
    elapsed_before, train_time_before, steady_before = 0.0, 0.0, (0.0, 0)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=d.is_main)
    last: dict = {}  # the latest step's record and the latest evaluation, for the summary
    last_eval: dict = {}
    if ckpt is not None:
        D.load_model_state(model, weights, d)
        D.load_optim_state(model, opt, st["optimizer"], d)
        rng = st["rng"][d.rank] if d.rank < len(st["rng"]) else st["rng"][0]
        set_rng_state(rng)
        step, running_min, best = st["step"], st["running_min"], st["best"]
        elapsed_before, train_time_before = st["elapsed_s"], st["train_time_s"]
        steady_before = tuple(st.get("steady", (0.0, 0)))
        metrics.truncate_after(step)
        last, last_eval = _restore_last(out / "metrics.jsonl", step)
        del weights, st
        log(f"[train] resumed from {ckpt} at step {step}")
    else:  # no checkpoint; start_plan refused a metrics.jsonl with records past the first checkpoint
        if resume:
            log(f"[train] --resume: no checkpoint in {ckpt_root}, starting from scratch")
        metrics.truncate_after(0)

    def checkpoint(at: int) -> None:
        msd = D.model_state(model, d)
        osd = D.optim_state(model, opt, d)
        rngs = _gather_rng(d)
        if d.is_main:
            save_checkpoint(ckpt_root, at, msd, {
                "optimizer": osd, "rng": rngs, "running_min": running_min, "best": best,
                "elapsed_s": elapsed_before + time.time() - t_start, "train_time_s": train_time,
                "steady": (steady_time, steady_steps),
                "tokens": at * tokens_per_step, "world_size": d.world_size,
                "schedule": {"kind": oc.schedule, "lr": oc.lr, "warmup": oc.warmup, "min_lr": oc.min_lr,
                             "steps": tc.steps, "step": at},
                "config": json.dumps(cfg.to_dict()),
            }, keep_last=tc.keep_last, config={**cfg.to_dict(), "model_config": mcfg.to_dict()})
        D.barrier()

    def do_eval(at: int) -> dict:
        nonlocal best
        r = evaluate(eval_model, val, d.device, autocast, mcfg.vocab_size) if val is not None else {}
        if r and (best["val_loss"] is None or r["val_loss"] < best["val_loss"]):
            best = {"val_loss": r["val_loss"], "step": at}
        if evaluator is not None:
            eval_model.eval()
            with torch.no_grad(), autocast():
                r.update(evaluator(eval_model))
            eval_model.train()
        if tc.shift_stats and d.mode != "fsdp":
            s = shift_summary(model)
            if s:
                r["shift"] = s
        return r

    if tc.progress and d.is_main:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=step, dynamic_ncols=True, unit="step", mininterval=1.0, file=sys.stderr)
    else:  # no tqdm object at all: it allocates a multiprocessing lock
        bar = NoBar()
    stop = StopFlag().install()
    status, diverged_step = "finished", None
    train_time = train_time_before
    # throughput excludes the first WARMUP_STEPS steps of every launch (compilation, autotuning)
    steady_time, steady_steps = steady_before
    launch_steps = 0
    model.train()
    if evaluating and tc.eval_at_start and step == 0:
        last_eval = do_eval(0)
        metrics.write({"step": 0, "tokens": 0, **last_eval, **coefficients_record(model, tc.coefficients_every)})
    try:
        while step < tc.steps:
            t0 = time.time()
            lr = lr_at(step, oc, tc.steps)
            set_lr(opt, lr)
            loss_acc = torch.zeros((), device=d.device)
            for m in range(dc.grad_accum):
                b = _to(sources[m].batch(step), d.device)
                with D.no_grad_sync(wrapped, d, skip=m < dc.grad_accum - 1), autocast():
                    logits = fwd(b["input_ids"], position_ids=b["position_ids"])  # (B, T, V)
                    loss = F.cross_entropy(logits.float().view(-1, mcfg.vocab_size), b["labels"].view(-1),
                                           ignore_index=-100)
                (loss / dc.grad_accum).backward()
                loss_acc += loss.detach()
            gnorm = _grad_norm(model, oc.clip)
            loss_v = float(D.all_reduce(loss_acc / dc.grad_accum, "mean"))
            bad = not math.isfinite(loss_v) or not math.isfinite(gnorm)
            if not bad and tc.diverge_factor and step >= diverge_after and loss_v > tc.diverge_factor * running_min:
                bad = True
            if bad:  # stop before the update: the last checkpoint stays the last good state
                status, diverged_step = "diverged", step + 1
                opt.zero_grad(set_to_none=True)
                log(f"[train] diverged at step {step + 1}: loss {loss_v:.4g}, grad norm {gnorm:.4g} "
                    f"(running min {running_min:.4g}, factor {tc.diverge_factor})")
                metrics.write({"step": step + 1, "tokens": (step + 1) * tokens_per_step, "loss": loss_v, "lr": lr,
                               "grad_norm": gnorm, "diverged": True})
                break
            opt.step()
            opt.zero_grad(set_to_none=True)
            running_min = min(running_min, loss_v)
            if d.device.type == "cuda":
                torch.cuda.synchronize(d.device)
            dt = time.time() - t0
            train_time += dt
            launch_steps += 1
            if launch_steps > WARMUP_STEPS:
                steady_time, steady_steps = steady_time + dt, steady_steps + 1
            step += 1
            rec = {"step": step, "tokens": step * tokens_per_step, "loss": loss_v, "lr": lr, "grad_norm": gnorm,
                   "tokens_per_s": tokens_per_step / max(dt, 1e-9),
                   "epoch": sources[0].epochs(step) if hasattr(sources[0], "epochs") else None}
            evaluated = evaluating and ((tc.eval_every and step % tc.eval_every == 0) or step == tc.steps)
            if evaluated:
                last_eval = do_eval(step)
                rec.update(last_eval)
            coefs = tc.coefficients_every and (step % tc.coefficients_every == 0 or step == tc.steps)
            if coefs:
                rec.update(coefficients_record(model, tc.coefficients_every))
            if step % max(tc.log_every, 1) == 0 or evaluated or coefs or step == tc.steps:
                metrics.write(rec)
            last = rec
            bar.update(1)
            if on_step is not None:
                on_step(step, rec)
            bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.3g}", refresh=False)
            sig = torch.tensor(float(stop.signum or 0), device=d.device)
            if d.distributed:
                D.all_reduce(sig, "max")
            if (tc.ckpt_every and step % tc.ckpt_every == 0) or step == tc.steps or sig.item():
                checkpoint(step)
            if sig.item() and step < tc.steps:
                status = "interrupted"
                log(f"[train] signal {int(sig.item())}: checkpoint at step {step} written; resume with --resume")
                break
    finally:
        bar.close()
        stop.restore()
        metrics.close()

    wall = elapsed_before + time.time() - t_start
    tokens = step * tokens_per_step
    tps_all = tokens / train_time if train_time > 0 else None
    tps = steady_steps * tokens_per_step / steady_time if steady_steps else tps_all
    env = environment(d.device)
    fpt = flops_per_token(mcfg, dc.seq_len)
    summary = {
        "status": status, "exit_code": {"finished": EXIT_OK, "diverged": EXIT_DIVERGED,
                                        "interrupted": EXIT_INTERRUPTED}[status],
        "diverged": status == "diverged", "diverged_step": diverged_step,
        "steps": step, "tokens": tokens, "epochs": sources[0].epochs(step) if hasattr(sources[0], "epochs") else None,
        "final_loss": last.get("loss"), "final_val_loss": last_eval.get("val_loss"),
        "final_val_bpb": last_eval.get("val_bpb"), "final_eval": last_eval or None,
        "best_val_loss": best["val_loss"], "best_val_step": best["step"],
        "wall_time_s": wall, "train_time_s": train_time, "tokens_per_s": tps,
        "tokens_per_s_with_warmup": tps_all, "throughput_steps": steady_steps,
        "flops_per_token": fpt, "peak_flops": tc.peak_flops, "world_size": d.world_size, "parallel": d.mode,
        "mfu": (tps * fpt / (tc.peak_flops * d.world_size)) if (tps and d.device.type == "cuda") else None,
        "params": sum(p.numel() for p in model.parameters()) if d.mode != "fsdp" else None,
        "non_embedding_params": mcfg.non_embedding_params(),
        # peak allocated CUDA memory since this launch began (of the last segment, for a resumed run); None on
        # CPU. Summaries without peak_memory_scope predate the reset and may hold an earlier run's peak.
        "peak_memory_bytes": torch.cuda.max_memory_allocated(d.device) if d.device.type == "cuda" else None,
        "peak_memory_scope": "launch" if d.device.type == "cuda" else None,
        "resumed_from": ckpt, "init_from": init_info, **env, "config": cfg.to_dict(), "model_config": mcfg.to_dict(),
    }
    if d.mode == "fsdp":
        summary["params"] = (mcfg.non_embedding_params() + mcfg.vocab_size * mcfg.dim * (1 if mcfg.tie_embeddings else 2)
                             + (mcfg.max_seq_len * mcfg.dim if mcfg.position == "learned" else 0))
    if d.is_main:
        uio.write_json_atomic(out / "summary.json", summary)
        vl = summary["final_val_loss"]
        log(f"[train] {status} at step {step}: loss {summary['final_loss']}, val loss "
            f"{'n/a' if vl is None else f'{vl:.4f}'}, {tokens:,} tokens in {wall:.0f}s -> {out}")
    D.barrier()
    return summary


def _restore_last(path: Path, step: int) -> tuple[dict, dict]:
    """The record of `step` and the latest evaluation up to it, from metrics.jsonl (rank 0 has it)."""
    recs = [r for r in read_metrics(path) if r.get("step", 0) <= step] if path.exists() else []
    last = recs[-1] if recs and recs[-1].get("step") == step else {}
    evals = [r for r in recs if "val_loss" in r]
    last_eval = {k: v for k, v in evals[-1].items() if k.startswith("val_") or k == "shift"} if evals else {}
    return last, last_eval


def _gather_rng(d: D.Dist) -> list[dict]:
    """Every rank's RNG states (rank i's at index i), complete on rank 0."""
    mine = rng_state()
    if not d.distributed:
        return [mine]
    import torch.distributed as dist

    box = [None] * d.world_size
    dist.all_gather_object(box, mine)
    return box
