"""The block part: the attention block forward + backward of every arm on the same inputs.

q/k/v are given as inputs; RoPE (+ K shift fused with RoPE and V shift for the shift arms) + SDPA (flash
backend where it accepts the shape), once eager and once under torch.compile (where inductor fuses
vanilla's RoPE too: the fair test).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvshift.bench.plan import (ARM_BACKEND, ARM_IMPL, Plan, arms_for_run, check_nonzero, error_entry, free_memory,
                                log, timer_name)
from kvshift.bench.report import ARMS, ratio
from kvshift.bench.timing import measure, synchronize
from kvshift.ops.rope import apply_rope, rope_cos_sin
from kvshift.ops.shift import kv_shift, shift_rope
from kvshift.ops.shift.attention import shift_attention


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
