"""The decode part: prefill a long context with the model's own cache, then greedy single-token steps
(eager), every arm interleaved. No fused-sdpa / fused-flash arm: the decode step is the fused arm's kernel.
"""

from __future__ import annotations

from typing import Callable

import torch

from kvshift.bench.plan import Plan, arms_for_run, build_model, check_nonzero, error_entry, free_memory, log, timer_name
from kvshift.bench.report import ARMS, ratio
from kvshift.bench.timing import measure, synchronize
from kvshift.models import LM, ModelConfig


def decode_prompt(vocab_size: int, batch: int, context: int, *, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(1, vocab_size, (batch, context), generator=g).to(device)
    check_nonzero("prompt", ids)
    return ids


def _decode_step(model: LM, cache, state: dict) -> Callable[[], None]:
    def step():
        with torch.no_grad():
            state["next"] = model(state["next"], cache=cache)[:, -1].argmax(-1, keepdim=True)  # greedy (B, 1)
    return step


def bench_decode(plan: Plan, device: torch.device, save: Callable[[dict], None]) -> dict:
    skip = arms_for_run()
    section = {"model": plan.decode_model, "overrides": plan.decode_overrides, "context": plan.decode_context,
               "settings": {"dtype": "bf16", "warmup": plan.decode_warmup, "iters": plan.decode_iters,
                            "compile": False, "sampling": "greedy",
                            "prefill": "one row prefilled with the cache, copied to every row (KVCache.reorder)",
                            "timer": timer_name(device)},
               "batches": {}}
    max_len = plan.decode_context + plan.decode_warmup + plan.decode_iters + 1
    base = ModelConfig.from_name(plan.decode_model, **{**plan.decode_overrides, "max_seq_len": max_len})
    prompt = decode_prompt(base.vocab_size, 1, plan.decode_context, device=device, seed=plan.seed)  # (1, ctx)
    models: dict[str, LM] = {}
    build_errors: dict[str, dict] = {}
    skip = {**skip, **{a: "the decode step is the same kernel as the fused arm's" for a in ("fused-sdpa", "fused-flash")}}
    for arm in ARMS:  # built once, shared weights equal across arms (same seed)
        if skip[arm]:
            continue
        try:
            model = build_model(base, arm, plan.seed)
            models[arm] = model.to(device=device, dtype=torch.bfloat16).eval()
        except Exception as e:  # noqa: BLE001
            build_errors[arm] = error_entry(e)
    for batch in plan.decode_batches:
        name = f"batch{batch}"
        log(f"decode {name}")
        case = {"batch": batch, "arms": {}, "ratios": {}}
        section["batches"][name] = case
        fns = {}
        for arm in ARMS:
            if skip[arm] or arm in build_errors:
                case["arms"][arm] = {"skipped": skip[arm]} if skip[arm] else build_errors[arm]
                continue
            try:
                model = models[arm]
                cache = model.new_cache(1, max_len)
                with torch.no_grad():
                    nxt = model(prompt, cache=cache)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
                # one prefilled row copied to every row: prefill memory stays that of batch 1
                rows = torch.zeros(batch, dtype=torch.long, device=device)
                cache.reorder(rows)
                fns[arm] = _decode_step(model, cache, {"next": nxt.index_select(0, rows)})
                synchronize(device)
            except Exception as e:  # noqa: BLE001
                case["arms"][arm] = error_entry(e)
            free_memory(device)
        if fns:
            try:
                res = measure(fns, warmup=plan.decode_warmup, iters=plan.decode_iters, device=device)
                for a, r in res.items():
                    case["arms"][a] = {**r, "tokens_per_s": batch / (r["median_ms"] / 1e3)}
            except Exception as e:  # noqa: BLE001
                err = error_entry(e)
                for a in fns:
                    case["arms"][a] = err
        case["arms"] = {a: case["arms"][a] for a in ARMS if a in case["arms"]}
        van = case["arms"].get("vanilla", {}).get("median_ms")
        case["ratios"] = {a: ratio(case["arms"].get(a, {}).get("median_ms"), van) for a in ARMS[1:]}
        del fns
        free_memory(device)
        save({"decode": section})
    del models
    free_memory(device)
    return section
