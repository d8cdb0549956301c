"""The attn part: the attention block forward + backward as a model runs it (supersedes the block part).

What the old block part (`kvshift.bench.block`) got wrong, and what this part does instead:
  * the output gradient: the old part handed every arm a (B, H, T, D)-contiguous gradient; in a model
    the block's output is (B, T, H, D) flattened to (B, T, H*D) for the output projection, whose backward
    hands back a (B, T, H*D)-contiguous gradient. Here every arm returns (B, T, H*D) exactly as
    `Attention._attend` / `_shift_attend` make it and gets that gradient (grad="tensor"), or the
    gradient of a real `wo` projection (grad="wo": both arms also pay the same matmul).
  * the attention kernels: the old vanilla arm was pinned to flash SDPA while the fused arm ran cuDNN.
    Here every case fixes one kernel family for every arm: SDPA under `sdpa_kernel(<family>)` for vanilla
    and fused-sdpa, `shift_attention(backend=<family>)` for the one-op fused arm (which calls
    `aten::_scaled_dot_product_cudnn_attention` or `aten::_flash_attention_forward`, the kernels SDPA's
    cuDNN and flash backends call). "math" is the CPU family (tests); the fused op's CPU path is math too.
  * timing: per iteration synchronised (latency, launch overhead included), back to back (N iterations
    between two events: GPU time unless launch-bound), optionally CUDA-graphed (launch overhead removed),
    and the GPU kernels themselves (torch.profiler: summed CUDA time and the top kernels per arm).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvshift.bench.plan import Plan, arms_for_run, check_nonzero, error_entry, free_memory, log
from kvshift.bench.profile import profile_kernels
from kvshift.bench.report import ATTN_ARMS, ratio
from kvshift.bench.timing import measure_modes, synchronize
from kvshift.ops.rope import apply_rope, rope_cos_sin
from kvshift.ops.shift import kv_shift, shift_rope
from kvshift.ops.shift.attention import attention_backend, shift_attention

# family -> (the SDPA backend vanilla and fused-sdpa run under, the one-op fused arm's `backend=`)
FAMILIES = {"cudnn": (SDPBackend.CUDNN_ATTENTION, "cudnn"), "flash": (SDPBackend.FLASH_ATTENTION, "flash"),
            "math": (SDPBackend.MATH, "auto")}
GRADS = ("tensor", "wo")
TIMINGS = ("sync", "b2b", "graph", "kernels")


def attn_inputs(B: int, T: int, H: int, H_kv: int, D: int, *, device, dtype=torch.bfloat16, grad: str = "tensor",
                seed: int = 0) -> dict:
    """Random q/k/v (B, T, H|H_kv, D) as the projections give them, shift coefficients (paper init,
    current-first), RoPE tables, and the output gradient in the model's layout: (B, T, H*D) contiguous,
    what `wo`'s backward hands the block (grad="tensor"), or (B, T, H*D) for a real `wo` of (H*D, H*D)
    weights (grad="wo": grad_out is then the projection's output gradient). Never zeros."""
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    r_k, r_v = torch.rand(H_kv, 1, generator=g), torch.rand(H_kv, 1, generator=g)
    cos, sin = rope_cos_sin(torch.arange(T, device=device).view(1, T), D)
    inp = {"q": mk(B, T, H, D).requires_grad_(), "k": mk(B, T, H_kv, D).requires_grad_(),
           "v": mk(B, T, H_kv, D).requires_grad_(), "grad_out": mk(B, T, H * D),
           "w_k": torch.cat([r_k, 1 - r_k], 1).to(device).requires_grad_(),
           "w_v": torch.cat([r_v, 1 - r_v], 1).to(device).requires_grad_(),
           "cos": cos, "sin": sin, "grad": grad,
           "wo": (mk(H * D, H * D) / (H * D) ** 0.5) if grad == "wo" else None}
    for n in ("q", "k", "v", "grad_out", "w_k", "w_v"):
        check_nonzero(n, inp[n])
    return inp


def attn_forward(arm: str, inp: dict, family: str, gqa: str = "native") -> Callable:
    """forward(q, k, v, w_k, w_v) -> (B, T, H*D) (or wo's output with grad="wo"), as the model's
    attention layer computes it. gqa "native" (enable_gqa / the fused op's own GQA) or "expand" (K/V
    repeated to every head before SDPA, for a family whose kernel takes no GQA; the fused op is native)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {family!r}")
    cos, sin, wo = inp["cos"], inp["sin"], inp["wo"]
    sdpa_backend, fused_backend = FAMILIES[family]

    def forward(q, k, v, w_k, w_v):
        # the family is chosen inside the traced function: torch.compile guards on it, so a graph compiled
        # for one family is never reused for another (dynamo does not guard an sdpa_kernel context entered
        # outside the compiled function, and its cache is keyed by this function's code)
        with sdpa_kernel([sdpa_backend]):
            return _forward(q, k, v, w_k, w_v)

    def _forward(q, k, v, w_k, w_v):
        B, T, H, D = q.shape
        qr = apply_rope(q, cos, sin)
        if arm == "fused":  # Attention._shift_attend
            out = shift_attention(qr, k, v, w_k, w_v, cos, sin, impl="triton", backend=fused_backend)
            out = out.reshape(B, T, H * D)
        else:  # Attention._attend
            if arm == "vanilla":
                kr, vs = apply_rope(k, cos, sin), v
            elif arm == "fused-sdpa":
                kr, vs = shift_rope(k, w_k, cos, sin, impl="triton"), kv_shift(v, w_v, impl="triton")
            else:
                raise ValueError(f"arm must be one of {ATTN_ARMS}, got {arm!r}")
            qh, kh, vh = qr.transpose(1, 2), kr.transpose(1, 2), vs.transpose(1, 2)
            rep = H // k.shape[2]
            if rep > 1 and gqa == "expand":
                kh, vh = kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=rep > 1 and gqa != "expand")
            out = o.transpose(1, 2).reshape(B, T, H * D)
        return out if wo is None else F.linear(out, wo)

    return forward


def attn_step(arm: str, inp: dict, family: str, *, compiled: bool = False, gqa: str = "native") -> Callable[[], None]:
    """One forward + backward of `arm` under `family`'s kernels; the gradients of q, k, v (and of the shift
    coefficients) are computed and dropped. compiled: the forward goes through torch.compile."""
    fwd = attn_forward(arm, inp, family, gqa)
    fwd = torch.compile(fwd) if compiled else fwd
    q, k, v, go = inp["q"], inp["k"], inp["v"], inp["grad_out"]
    wrt = (q, k, v) if arm == "vanilla" else (q, k, v, inp["w_k"], inp["w_v"])

    def step():  # the family's kernels are chosen inside the forward (attn_forward)
        out = fwd(q, k, v, inp["w_k"], inp["w_v"])
        torch.autograd.grad(out, wrt, go)

    return step


def cuda_graphed(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """`step` captured in a CUDA graph (3 warm-up calls on a side stream first); replaying it launches the
    whole forward + backward at once. The inputs are fixed, so the replays compute the same thing."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _graph_times(fns: dict, device: torch.device, iters: int, rounds: int) -> dict[str, dict]:
    out = {}
    for arm, fn in fns.items():
        try:
            replay = cuda_graphed(fn, device)
            out[arm] = measure_modes({arm: replay}, warmup=2, iters=iters, rounds=rounds, device=device)[arm]["b2b"]
        except Exception as e:  # noqa: BLE001 - a graph that cannot be captured leaves the other timings
            out[arm] = error_entry(e)
        free_memory(device)
    return out


def _case_ratios(arms: dict) -> dict:
    ok = {a: r for a, r in arms.items() if isinstance(r, dict) and "error" not in r and "skipped" not in r}

    def get(a, kind):
        r = ok.get(a, {}).get(kind, {})
        return r.get("total_ms_per_step") if kind == "kernels" else r.get("median_ms")

    return {kind: {a: ratio(get(a, kind), get("vanilla", kind)) for a in ATTN_ARMS[1:]} for kind in TIMINGS}


def _pick_gqa(inp: dict, family: str, device: torch.device) -> str:
    """native when vanilla's SDPA takes GQA under this family, else expand (MHA shapes: native)."""
    if inp["q"].shape[2] == inp["k"].shape[2]:
        return "native"
    try:
        attn_step("vanilla", inp, family)()
        synchronize(device)
        return "native"
    except RuntimeError as e:
        log(f"{family} SDPA takes no GQA here ({str(e).splitlines()[0][:100]}): K/V expanded for the SDPA arms")
        return "expand"


def bench_attn(plan: Plan, device: torch.device, save: Callable[[dict], None]) -> dict:
    cuda = device.type == "cuda"
    families = [f for f in plan.attn_families if cuda or f != "cudnn"]
    section = {"settings": {"dtype": "bf16", "warmup": plan.attn_warmup, "iters": plan.attn_iters,
                            "rounds": plan.attn_rounds, "modes": list(plan.block_modes), "families": families,
                            "grad": plan.attn_grad, "grad_layout": "(B, T, H*D) contiguous, as wo's backward gives it",
                            "graph": plan.attn_graph and cuda, "profile": cuda or plan.profile,
                            "timer": "sync: perf_counter + synchronize per iteration; b2b: " +
                                     ("CUDA events around N iterations" if cuda else "perf_counter around N iterations")},
               "shapes": {}}
    skip = arms_for_run()
    for (B, T, H, H_kv, D) in plan.block_shapes:
        shape = f"B{B}-T{T}-H{H}" + (f"kv{H_kv}" if H_kv != H else "") + f"-D{D}"
        try:
            inp = attn_inputs(B, T, H, H_kv, D, device=device, grad=plan.attn_grad, seed=plan.seed)
        except Exception as e:  # noqa: BLE001
            section["shapes"][shape] = {"B": B, "T": T, "H": H, "H_kv": H_kv, "D": D, **error_entry(e)}
            continue
        for family in families:
            gqa = _pick_gqa(inp, family, device)
            for mode in plan.block_modes:
                name = f"{shape}-{family}-{mode}"
                log(f"attn {name}")
                case = {"B": B, "T": T, "H": H, "H_kv": H_kv, "D": D, "family": family, "mode": mode, "gqa": gqa,
                        # the kernels the one-op arm really calls ("math" on a CPU)
                        "fused_kernels": attention_backend(inp["q"], None, FAMILIES[family][1]),
                        "arms": {}, "ratios": {}}
                section["shapes"][name] = case
                torch._dynamo.reset()
                fns = {}
                for arm in ATTN_ARMS:
                    if skip[arm]:
                        case["arms"][arm] = {"skipped": skip[arm]}
                        continue
                    try:
                        fn = attn_step(arm, inp, family, compiled=mode == "compiled", gqa=gqa)
                        fn()  # compiles / autotunes outside the timing
                        synchronize(device)
                        fns[arm] = fn
                    except Exception as e:  # noqa: BLE001
                        case["arms"][arm] = error_entry(e)
                if fns:
                    try:
                        res = measure_modes(fns, warmup=plan.attn_warmup, iters=plan.attn_iters,
                                            rounds=plan.attn_rounds, device=device)
                        for a, r in res.items():
                            case["arms"][a] = r
                        if cuda or plan.profile:
                            for a, fn in fns.items():
                                case["arms"][a]["kernels"] = profile_kernels(fn, device, steps=3, top=8)
                        if plan.attn_graph and cuda:  # last: a capture that fails leaves the other timings
                            for a, r in _graph_times(fns, device, plan.attn_iters, plan.attn_rounds).items():
                                case["arms"][a]["graph"] = r
                    except Exception as e:  # noqa: BLE001
                        err = error_entry(e)
                        case["arms"].update({a: err for a in fns})
                case["arms"] = {a: case["arms"][a] for a in ATTN_ARMS if a in case["arms"]}
                case["ratios"] = _case_ratios(case["arms"])
                del fns
                free_memory(device)
                save({"attn": section})
        del inp
        torch._dynamo.reset()
        free_memory(device)
    return section


__all__ = ["ATTN_ARMS", "FAMILIES", "attn_inputs", "attn_forward", "attn_step", "bench_attn"]
