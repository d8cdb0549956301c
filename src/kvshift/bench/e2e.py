"""The e2e part: a full training step of a bench preset per arm: torch.compile(model + loss), bf16
autocast, fused AdamW; tokens/s, MFU, peak memory. With --profile also each arm's top GPU kernels
(`kvshift.bench.profile.profile_kernels`: torch.profiler, 2 steps after the timing).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kvshift.bench.plan import (MIXER_ARMS, Plan, arms_for_run, build_model, check_nonzero, device_name, error_entry,
                                free_memory, log, timer_name)
from kvshift.bench.profile import profile_kernels
from kvshift.bench.report import ARMS, ratio
from kvshift.bench.timing import measure, synchronize
from kvshift.models import LM, ModelConfig
from kvshift.train.flops import flops_per_token, peak_flops_for


class _LossModel(nn.Module):
    """model + next-token cross-entropy, compiled as one graph (the fp32 logits never materialise
    outside it)."""

    def __init__(self, model: LM):
        super().__init__()
        self.model = model

    def forward(self, x, y, pos=None):
        logits = self.model(x, position_ids=pos)  # (B, T, V); pos: packed documents
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))


def train_batch(cfg: ModelConfig, batch: int, seq_len: int, *, device, seed: int = 0):
    """Random token ids in [1, vocab): inputs (B, T) and next-token labels (B, T)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (batch, seq_len + 1), generator=g).to(device)
    check_nonzero("input_ids", ids)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def n_params(cfg: ModelConfig) -> int:
    """Parameter count of an LM of `cfg`, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return sum(p.numel() for p in LM(cfg, seed=None).parameters())


def document_lengths() -> dict:
    """The corpus's document-length quantiles (bench/doc_lengths.json: what they are and how they were made)."""
    return json.loads((Path(__file__).parent / "doc_lengths.json").read_text())


def packed_positions(batch: int, seq_len: int, *, seed: int = 0) -> tuple[torch.Tensor, list[list[int]]]:
    """position_ids (B, T) of rows packed with documents whose lengths are drawn from the corpus's length
    distribution (inverse CDF over its quantiles, seeded): 0 at every document start, a document cut at the
    end of a row continues at 0 in the next (as the trainer's shards loader does without `continue_rows`).
    Also returns each row's document lengths."""
    q = np.asarray(document_lengths()["quantiles"], dtype=np.float64)
    rng = np.random.default_rng(seed)
    pos = np.zeros((batch, seq_len), dtype=np.int64)
    docs = []
    for b in range(batch):
        row, t = [], 0
        while t < seq_len:
            n = max(1, int(round(np.interp(rng.random(), np.linspace(0, 1, q.size), q))))
            n = min(n, seq_len - t)
            pos[b, t:t + n] = np.arange(n)
            row.append(n)
            t += n
        docs.append(row)
    return torch.from_numpy(pos), docs


def _e2e_arm(cfg: ModelConfig, arm: str, batch: int, seq_len: int, plan: Plan, device: torch.device,
             peak: float, layout: str = "dense") -> dict:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    torch._dynamo.reset()  # every arm compiles from scratch under identical settings
    model = build_model(cfg, arm, plan.seed).to(device)
    model.train()
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, betas=(0.9, 0.95),
                            **({"fused": True} if cuda else {}))
    step_model = _LossModel(model)
    step_model = torch.compile(step_model) if plan.compile else step_model
    x, y = train_batch(cfg, batch, seq_len, device=device, seed=plan.seed)
    pos = packed_positions(batch, seq_len, seed=plan.seed)[0].to(device) if layout == "packed" else None
    last_loss = []

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = step_model(x, y, pos)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last_loss[:] = [loss.detach()]

    t0 = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - t0
    for _ in range(plan.e2e_warmup - 1):
        step()
    synchronize(device)
    if cuda:  # model, optimizer state and the steady-state working set, not the compile
        torch.cuda.reset_peak_memory_stats(device)
    timing = measure({"step": step}, warmup=0, iters=plan.e2e_iters, device=device)["step"]
    tps = batch * seq_len / (timing["median_ms"] / 1e3)
    peak_mem = torch.cuda.max_memory_allocated(device) if cuda else None
    loss = float(last_loss[0])
    prof = None
    if plan.profile:
        try:
            # the top 40 by time: enough to reach the shift's and the mixers' own Triton kernels (the report shows 6)
            prof = profile_kernels(step, device, top=40)
        except Exception as e:  # noqa: BLE001 - the timing stands without the profile
            prof = error_entry(e)
    del model, opt, step_model, x, y, pos, last_loss
    fpt = flops_per_token(cfg, seq_len)
    out = {"tokens_per_s": tps, "step": timing, "flops_per_token": fpt, "mfu": tps * fpt / peak,
           "peak_mem_bytes": peak_mem, "peak_mem_gib": None if peak_mem is None else peak_mem / 2**30,
           "first_step_s": first, "loss": loss if math.isfinite(loss) else None}
    if prof is not None:
        out["profile"] = prof
    return out


# vanilla first, then fused: if the run is cut short, the headline comparison is already saved
E2E_ORDER = ("vanilla", "fused", "fused-flash", "fused-sdpa", "naive") + MIXER_ARMS


def bench_e2e(plan: Plan, device: torch.device, save: Callable[[dict], None]) -> dict:
    name = device_name(device)
    peak = plan.peak_flops or peak_flops_for(name, default=989e12)
    section = {"settings": {"autocast": "bf16", "compile": "torch.compile(model + loss)" if plan.compile else "none",
                            "fused_adamw": device.type == "cuda", "warmup": plan.e2e_warmup, "iters": plan.e2e_iters,
                            "peak_flops": peak, "timer": timer_name(device)},
               "models": {}}
    skip = arms_for_run()
    for label, preset, overrides, seq_len, batch, *rest in plan.e2e_models:
        layout = rest[0] if rest else "dense"
        if layout not in ("dense", "packed"):
            raise ValueError(f"e2e model {label}: layout must be 'dense' or 'packed', got {layout!r}")
        base = ModelConfig.from_name(preset, **overrides)
        case = {"preset": preset, "overrides": overrides, "seq_len": seq_len, "batch": batch, "layout": layout,
                "params": n_params(base),
                "arms": {}, "ratios": {}}
        if layout == "packed":
            docs = packed_positions(batch, seq_len, seed=plan.seed)[1]
            case["documents_per_row"] = sum(map(len, docs)) / len(docs)
            # MFU counts attention over the whole row (as for a dense row): documents attend only within
            # themselves, so it overstates the work done; tokens/s and the ratios are what to read
            case["mfu_note"] = "dense-equivalent FLOPs: attention counted over the whole row"
        section["models"][label] = case
        for arm in ["vanilla"] + [a for a in E2E_ORDER if a != "vanilla" and a in plan.e2e_arms]:
            if skip[arm]:
                case["arms"][arm] = {"skipped": skip[arm]}
                continue
            log(f"e2e {label} {arm}")
            free_memory(device)
            try:
                case["arms"][arm] = _e2e_arm(base, arm, batch, seq_len, plan, device, peak, layout)
                a = case["arms"][arm]
                log(f"  {a['tokens_per_s']:,.0f} tok/s, MFU {a['mfu']:.1%}, first step {a['first_step_s']:.1f}s")
            except Exception as e:  # noqa: BLE001
                case["arms"][arm] = error_entry(e)
            torch._dynamo.reset()  # drop the compiled graphs (and what they hold) before the next arm
            free_memory(device)
            case["arms"] = {a: case["arms"][a] for a in ARMS + MIXER_ARMS if a in case["arms"]}
            van = case["arms"].get("vanilla", {})
            case["ratios"] = {
                "tokens_per_s": {a: ratio(case["arms"].get(a, {}).get("tokens_per_s"), van.get("tokens_per_s"))
                                 for a in case["arms"] if a != "vanilla"},
                "peak_mem": {a: ratio(case["arms"].get(a, {}).get("peak_mem_bytes"), van.get("peak_mem_bytes"))
                             for a in case["arms"] if a != "vanilla"},
            }
            save({"e2e": section})
    return section
