"""`kvshift bench`: vanilla vs kvshift-naive vs kvshift-fused, measured in one process.

Three parts, each with the same settings for every arm:
  block   the attention block forward + backward: q/k/v given as inputs, RoPE (+ K shift fused with
          RoPE and V shift for the shift arms) + SDPA (flash backend where it accepts the shape), once
          eager and once under torch.compile (where inductor fuses vanilla's RoPE too: the fair test)
  e2e     a full training step of a bench preset: torch.compile(model + loss), bf16 autocast,
          fused AdamW; tokens/s, MFU, peak memory
  decode  prefill a long context with the model's own cache, then greedy single-token steps (eager)

Arms and plans: `kvshift.bench.plan`. Decode has no fused-sdpa / fused-flash arm (the decode step is the
same kernel). With --profile the e2e part also records each arm's top GPU kernels (torch.profiler,
2 steps after the timing).
Results go to <out>/<device-slug>.json and .md after every finished case, so a run cut short keeps
what it measured; with --only the other parts of an earlier result for the same device are kept.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvshift.bench.plan import (ARM_BACKEND, ARM_IMPL, PARTS, Plan, arms_for_run, build_model, check_nonzero,
                                device_name, device_slug, error_entry, free_memory, fused_available, log, timer_name)
from kvshift.bench.report import ARMS, compute_targets, ratio, render_markdown, target_summary
from kvshift.bench.timing import measure, synchronize
from kvshift.models import LM, ModelConfig
from kvshift.ops.rope import apply_rope, rope_cos_sin
from kvshift.ops.shift import kv_shift, shift_rope
from kvshift.ops.shift.attention import shift_attention
from kvshift.train.flops import flops_per_token, peak_flops_for


def provenance(device: torch.device, quick: bool) -> dict:
    import platform

    import kvshift
    from kvshift.utils.provenance import git_commit

    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    name = device_name(device)
    return {
        "device": name, "device_slug": device_slug(name), "quick": quick,
        "command": " ".join(["kvshift"] + sys.argv[1:]) if sys.argv and sys.argv[0].endswith(("kvshift", "cli.py"))
        else " ".join(sys.argv),
        "git_commit": git_commit(), "kvshift": kvshift.__version__, "torch": torch.__version__,
        "triton": triton_version, "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_threads": torch.get_num_threads(),
    }


# ---- (a) the attention block --------------------------------------------------------------------
def block_inputs(B: int, T: int, H: int, H_kv: int, D: int, *, device, dtype=torch.bfloat16, seed: int = 0) -> dict:
    """Random q/k/v (B, T, H|H_kv, D), output gradient (B, H, T, D), shift coefficients in the
    paper's init (current-first, (H_kv, 2)) and RoPE tables for positions 0..T-1. Never zeros."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    r_k, r_v = torch.rand(H_kv, 1, generator=g), torch.rand(H_kv, 1, generator=g)
    cos, sin = rope_cos_sin(torch.arange(T, device=device).view(1, T), D)  # (1, T, D/2)
    inp = {
        "q": mk(B, T, H, D).requires_grad_(), "k": mk(B, T, H_kv, D).requires_grad_(),
        "v": mk(B, T, H_kv, D).requires_grad_(), "grad_out": mk(B, H, T, D),
        "w_k": torch.cat([r_k, 1 - r_k], 1).to(device).requires_grad_(),
        "w_v": torch.cat([r_v, 1 - r_v], 1).to(device).requires_grad_(),
        "cos": cos, "sin": sin,
    }
    for n in ("q", "k", "v", "grad_out", "w_k", "w_v"):
        check_nonzero(n, inp[n])
    return inp


SDPA_BACKENDS = ("flash", "flash-expand", "default")


def _sdpa_context(backend: str):
    if backend in ("flash", "flash-expand"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    return nullcontext()


def block_step(arm: str, inp: dict, backend: str, compiled: bool = False) -> Callable[[], None]:
    """One forward + backward of the attention block for `arm`; gradients of every input (and of
    the shift coefficients) are computed and dropped, so iterations do not accumulate.

    backend: "flash" (flash SDPA, GQA through enable_gqa), "flash-expand" (K/V repeated to all
    heads, for a flash kernel without GQA support) or "default" (PyTorch's choice). The "fused" arm
    runs its own flash kernels (`shift_attention`) whatever the backend. compiled: the forward
    (RoPE, shift, attention) goes through torch.compile, as in a compiled training step."""
    if backend not in SDPA_BACKENDS:
        raise ValueError(f"backend must be one of {SDPA_BACKENDS}, got {backend!r}")
    q, k, v, cos, sin, go = inp["q"], inp["k"], inp["v"], inp["cos"], inp["sin"], inp["grad_out"]
    rep = q.shape[2] // k.shape[2]
    wrt = (q, k, v) if arm == "vanilla" else (q, k, v, inp["w_k"], inp["w_v"])

    def forward(q, k, v, w_k, w_v):
        qr = apply_rope(q, cos, sin)
        if arm in ARM_BACKEND:
            return shift_attention(qr, k, v, w_k, w_v, cos, sin, impl="triton",
                                   backend=ARM_BACKEND[arm]).transpose(1, 2)  # (B, H, T, D)
        if arm == "vanilla":
            kr, vs = apply_rope(k, cos, sin), v
        else:
            kr = shift_rope(k, w_k, cos, sin, impl=ARM_IMPL[arm])
            vs = kv_shift(v, w_v, impl=ARM_IMPL[arm])
        qh, kh, vh = qr.transpose(1, 2), kr.transpose(1, 2), vs.transpose(1, 2)  # (B, H|Hkv, T, D)
        if rep > 1 and backend == "flash-expand":
            kh, vh = kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True,
                                              enable_gqa=rep > 1 and backend != "flash-expand")  # (B, H, T, D)

    fwd = torch.compile(forward) if compiled else forward

    def step():
        with _sdpa_context(backend):
            out = fwd(q, k, v, inp["w_k"], inp["w_v"])
        torch.autograd.grad(out, wrt, go)

    return step


def pick_sdpa_backend(inp: dict, device: torch.device) -> str:
    """The first of flash / flash-expand (GQA only) / default that runs this shape; decided once
    per shape and used by every arm."""
    gqa = inp["q"].shape[2] != inp["k"].shape[2]
    for backend in ("flash", "flash-expand") if gqa else ("flash",):
        try:
            block_step("vanilla", inp, backend)()
            synchronize(device)
            return backend
        except RuntimeError as e:
            log(f"SDPA backend {backend} unavailable for this shape ({str(e).splitlines()[0][:120]})")
    return "default"


def bench_block(plan: Plan, device: torch.device, save: Callable[[dict], None]) -> dict:
    section = {"settings": {"dtype": "bf16", "warmup": plan.block_warmup, "iters": plan.block_iters,
                            "modes": list(plan.block_modes),
                            "timer": timer_name(device)},
               "shapes": {}}
    skip = arms_for_run()
    for (B, T, H, H_kv, D) in plan.block_shapes:
        shape = f"B{B}-T{T}-H{H}" + (f"kv{H_kv}" if H_kv != H else "") + f"-D{D}"
        try:
            inp = block_inputs(B, T, H, H_kv, D, device=device, seed=plan.seed)
            backend = pick_sdpa_backend(inp, device)
        except Exception as e:  # noqa: BLE001 - a failed case is recorded, the run goes on
            section["shapes"][shape] = {"B": B, "T": T, "H": H, "H_kv": H_kv, "D": D, "error": error_entry(e)["error"]}
            continue
        for mode in plan.block_modes:
            name = f"{shape}-{mode}"
            log(f"block {name}")
            case = {"B": B, "T": T, "H": H, "H_kv": H_kv, "D": D, "mode": mode, "sdpa_backend": backend,
                    "arms": {}, "ratios": {}}
            section["shapes"][name] = case
            torch._dynamo.reset()
            fns = {}
            for arm in ARMS:
                if skip[arm]:
                    case["arms"][arm] = {"skipped": skip[arm]}
                    continue
                fn = block_step(arm, inp, backend, compiled=mode == "compiled")
                try:
                    fn()  # first call: compiles / Triton autotunes here, outside the timing
                    synchronize(device)
                    fns[arm] = fn
                except Exception as e:  # noqa: BLE001
                    case["arms"][arm] = error_entry(e)
            if fns:
                try:
                    case["arms"].update(measure(fns, warmup=plan.block_warmup, iters=plan.block_iters, device=device))
                except Exception as e:  # noqa: BLE001
                    err = error_entry(e)
                    case["arms"].update({a: err for a in fns})
            case["arms"] = {a: case["arms"][a] for a in ARMS if a in case["arms"]}
            van = case["arms"].get("vanilla", {}).get("median_ms")
            for arm in ARMS[1:]:
                case["ratios"][arm] = ratio(case["arms"].get(arm, {}).get("median_ms"), van)
            del fns
            free_memory(device)
            save({"block": section})
        del inp
        torch._dynamo.reset()
        free_memory(device)
    return section


# ---- (b) end-to-end training --------------------------------------------------------------------
class _LossModel(nn.Module):
    """model + next-token cross-entropy, compiled as one graph (the fp32 logits never materialise
    outside it)."""

    def __init__(self, model: LM):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        logits = self.model(x)  # (B, T, V)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))


def train_batch(cfg: ModelConfig, batch: int, seq_len: int, *, device, seed: int = 0):
    """Random token ids in [1, vocab): inputs (B, T) and next-token labels (B, T)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (batch, seq_len + 1), generator=g).to(device)
    check_nonzero("input_ids", ids)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def profile_kernels(step: Callable[[], None], device: torch.device, steps: int = 2, top: int = 12) -> dict:
    """The GPU kernels of `steps` calls of `step` (torch.profiler): the `top` by total device time, and
    the total per family (attention, matmul, triton, other), in ms per step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t and t > 0 and e.device_type is not None and "cuda" in str(e.device_type).lower():
            rows.append((e.key, e.count, t / 1e3 / steps))
    rows.sort(key=lambda r: -r[2])

    def family(name: str) -> str:
        n = name.lower()
        if "flash" in n or "fmha" in n or "attention" in n or "attn" in n:
            return "attention"
        if "gemm" in n or "cutlass" in n or "sm90" in n or "nvjet" in n or "matmul" in n or "mm_" in n:
            return "matmul"
        if "triton" in n or "_kernel" in n:
            return "triton/elementwise"
        return "other"

    fam: dict[str, float] = {}
    for k, _, t in rows:
        fam[family(k)] = fam.get(family(k), 0.0) + t
    return {"steps": steps, "total_ms_per_step": sum(r[2] for r in rows),
            "families_ms_per_step": {k: round(v, 4) for k, v in sorted(fam.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": k[:160], "calls_per_step": c / steps, "ms_per_step": round(t, 4)}
                    for k, c, t in rows[:top]]}


def _e2e_arm(cfg: ModelConfig, arm: str, batch: int, seq_len: int, plan: Plan, device: torch.device,
             peak: float) -> dict:
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
    last_loss = []

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = step_model(x, y)
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
            prof = profile_kernels(step, device)
        except Exception as e:  # noqa: BLE001 - the timing stands without the profile
            prof = error_entry(e)
    del model, opt, step_model, x, y, last_loss
    fpt = flops_per_token(cfg, seq_len)
    out = {"tokens_per_s": tps, "step": timing, "flops_per_token": fpt, "mfu": tps * fpt / peak,
           "peak_mem_bytes": peak_mem, "peak_mem_gib": None if peak_mem is None else peak_mem / 2**30,
           "first_step_s": first, "loss": loss if math.isfinite(loss) else None}
    if prof is not None:
        out["profile"] = prof
    return out


def bench_e2e(plan: Plan, device: torch.device, save: Callable[[dict], None]) -> dict:
    name = device_name(device)
    peak = plan.peak_flops or peak_flops_for(name, default=989e12)
    section = {"settings": {"autocast": "bf16", "compile": "torch.compile(model + loss)" if plan.compile else "none",
                            "fused_adamw": device.type == "cuda", "warmup": plan.e2e_warmup, "iters": plan.e2e_iters,
                            "peak_flops": peak, "timer": timer_name(device)},
               "models": {}}
    skip = arms_for_run()
    # vanilla first, then fused: if the run is cut short, the headline comparison is already saved
    for label, preset, overrides, seq_len, batch in plan.e2e_models:
        base = ModelConfig.from_name(preset, **overrides)
        case = {"preset": preset, "overrides": overrides, "seq_len": seq_len, "batch": batch, "arms": {}, "ratios": {}}
        section["models"][label] = case
        for arm in ("vanilla", "fused", "fused-flash", "fused-sdpa", "naive"):
            if skip[arm]:
                case["arms"][arm] = {"skipped": skip[arm]}
                continue
            log(f"e2e {label} {arm}")
            free_memory(device)
            try:
                case["arms"][arm] = _e2e_arm(base, arm, batch, seq_len, plan, device, peak)
                a = case["arms"][arm]
                log(f"  {a['tokens_per_s']:,.0f} tok/s, MFU {a['mfu']:.1%}, first step {a['first_step_s']:.1f}s")
            except Exception as e:  # noqa: BLE001
                case["arms"][arm] = error_entry(e)
            torch._dynamo.reset()  # drop the compiled graphs (and what they hold) before the next arm
            free_memory(device)
            case["arms"] = {a: case["arms"][a] for a in ARMS if a in case["arms"]}
            van = case["arms"].get("vanilla", {})
            case["ratios"] = {
                "tokens_per_s": {a: ratio(case["arms"].get(a, {}).get("tokens_per_s"), van.get("tokens_per_s"))
                                 for a in ARMS[1:]},
                "peak_mem": {a: ratio(case["arms"].get(a, {}).get("peak_mem_bytes"), van.get("peak_mem_bytes"))
                             for a in ARMS[1:]},
            }
            save({"e2e": section})
    return section


# ---- (c) decode ---------------------------------------------------------------------------------
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


# ---- orchestration ------------------------------------------------------------------------------
def _load_previous(path: Path, meta: dict) -> dict:
    """Sections of an earlier result for the same device and mode (kept when --only re-runs others)."""
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    pm = prev.get("meta", {})
    if pm.get("device") != meta["device"] or pm.get("quick") != meta["quick"]:
        return {}
    return {p: prev[p] for p in PARTS if p in prev}


def write_results(results: dict, out: Path) -> tuple[Path, Path]:
    results["targets"] = compute_targets(results)
    results["summary"] = target_summary(results["targets"])
    order = ("meta", *PARTS, "targets", "summary")
    ordered = {k: results[k] for k in order if k in results}
    results.clear()
    results.update(ordered)
    out.mkdir(parents=True, exist_ok=True)
    slug = results["meta"]["device_slug"]
    jp, mp = out / f"{slug}.json", out / f"{slug}.md"
    jp.write_text(json.dumps(results, indent=1) + "\n")
    mp.write_text(render_markdown(results))
    return jp, mp


def merge_results(paths: list[str | Path], out: str | Path) -> dict:
    """One result from several runs of the same device (parts run as separate processes on separate GPUs
    of one machine): each part's cases (block shapes, e2e models, decode batches) are the union over the
    files, a later file winning a case both hold; meta.merged_from lists the files."""
    if len(paths) < 2:
        raise ValueError("--merge needs at least two result files")
    runs = []
    for p in paths:
        try:
            runs.append((str(p), json.loads(Path(p).read_text())))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read bench result {p}: {e}") from e
    devices = {r["meta"].get("device") for _, r in runs}
    if len(devices) != 1 or len({r["meta"].get("quick") for _, r in runs}) != 1:
        raise ValueError(f"the results come from different devices or modes: {sorted(map(str, devices))}")
    meta = dict(runs[0][1]["meta"])
    meta["merged_from"] = [{"file": Path(p).name, "command": r["meta"].get("command"), "time_utc": r["meta"].get("time_utc"),
                            "git_commit": r["meta"].get("git_commit"),
                            "parts": [k for k in PARTS if k in r and not r[k].get("from_earlier_run")]}
                           for p, r in runs]
    results: dict = {"meta": meta}
    cases = {"block": "shapes", "e2e": "models", "decode": "batches"}
    for _, r in runs:
        for part in PARTS:
            if part in r and not r[part].get("from_earlier_run"):
                if part in results:  # the same part from several runs (e.g. one e2e model per GPU): union of cases
                    merged = {**results[part][cases[part]], **r[part].get(cases[part], {})}
                    results[part] = {**r[part], cases[part]: merged}
                else:
                    results[part] = r[part]
    write_results(results, Path(out))
    return results


def run_bench(plan: Plan, out: str | Path, *, device: torch.device | None = None) -> dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unknown = set(plan.parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown bench parts {sorted(unknown)}; choose from {PARTS}")
    out = Path(out)
    torch.set_float32_matmul_precision("high")
    meta = provenance(device, plan.quick)
    meta["plan"] = asdict(plan)
    meta["fused_available"] = fused_available()
    results: dict = {"meta": meta}
    previous = _load_previous(out / f"{meta['device_slug']}.json", meta)
    for p, sec in previous.items():
        if p not in plan.parts:
            results[p] = {**sec, "from_earlier_run": True}

    def save(update: dict) -> None:
        results.update(update)
        write_results(results, out)

    runners = {"block": bench_block, "e2e": bench_e2e, "decode": bench_decode}
    for part in ("block", "decode", "e2e"):  # the long compile-bound part last: a cut-short run keeps the rest
        if part in plan.parts:
            t0 = time.perf_counter()
            results[part] = runners[part](plan, device, save)
            results[part]["wall_s"] = time.perf_counter() - t0
            save({})
            log(f"{part} done in {results[part]['wall_s']:.0f}s")
    write_results(results, out)
    return results
