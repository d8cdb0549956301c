"""torch.profiler for the bench parts: the kernels of a training / attention step (`profile_kernels`, e2e and
attn) and of one decode step through generate (`profile_decode`, the generate part), with one classification
of kernels into families (`family`).

profile_decode measures what one generated token costs in kernels the way the generate part times it: two
profiled generate calls of the same prompt, one with N new tokens and one with 1 (the prefill and the first
token), and per kernel name (calls(N) - calls(1)) / (N - 1) and (time(N) - time(1)) / (N - 1). Only the
kernels whose call count grows with N are kept: a kernel that runs as often in both calls belongs to the
prefill, and its time difference is noise. On CUDA "kernels" are the GPU kernels (device time; under CUDA
graphs the replayed graph's kernels where the profiler sees them, and the host's kernel and graph launches
are counted too); on a CPU they are the aten operators (self CPU time), so the structure can be tested
without a GPU.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from kvshift.bench.timing import synchronize

# host-side CUDA runtime / driver calls that launch one kernel, and the one that replays a whole CUDA graph
KERNEL_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                   "cudaLaunchCooperativeKernel")
GRAPH_LAUNCHES = ("cudaGraphLaunch", "cuGraphLaunch")
# host calls that wait for the GPU: the host stops issuing work, so the GPU idles behind them
HOST_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cuStreamSynchronize", "cuCtxSynchronize", "cuMemcpyDtoH_v2")
CPU_MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul")
GRAPH_INVISIBLE = "kernels inside a CUDA graph are not visible to the profiler (graph launches counted only)"


def family(name: str) -> str:
    """The family of a kernel (or, on a CPU, an aten op): attention, matmul, triton/elementwise or other."""
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n or "attn" in n:
        return "attention"
    if ("gemm" in n or "cutlass" in n or "sm90" in n or "nvjet" in n or "matmul" in n or "mm_" in n
            or n in CPU_MATMULS):
        return "matmul"
    if "triton" in n or "_kernel" in n:
        return "triton/elementwise"
    return "other"


def _activities(device: torch.device) -> list:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def _device_us(e) -> float:
    t = getattr(e, "self_device_time_total", None)
    return getattr(e, "self_cuda_time_total", 0) if t is None else t


def gpu_rows(prof) -> list[tuple[str, int, float]]:
    """(kernel, calls, total µs) of every GPU kernel the profiler saw, the longest first."""
    rows = [(e.key, e.count, _device_us(e)) for e in prof.key_averages()
            if _device_us(e) and _device_us(e) > 0 and e.device_type is not None
            and "cuda" in str(e.device_type).lower()]
    return sorted(rows, key=lambda r: -r[2])


def cpu_op_rows(prof) -> list[tuple[str, int, float]]:
    """(aten op, calls, total self-CPU µs) of the aten operators (a CPU's stand-in for kernels)."""
    rows = [(e.key, e.count, e.self_cpu_time_total) for e in prof.key_averages()
            if e.key.startswith("aten::") and e.self_cpu_time_total > 0]
    return sorted(rows, key=lambda r: -r[2])


def _families(rows, per: float) -> dict[str, float]:
    fam: dict[str, float] = {}
    for k, _, t in rows:
        fam[family(k)] = fam.get(family(k), 0.0) + t / per
    return dict(sorted(fam.items(), key=lambda kv: -kv[1]))


def profile_kernels(step: Callable[[], None], device: torch.device, steps: int = 2, top: int = 12) -> dict:
    """The GPU kernels of `steps` calls of `step` (torch.profiler): the `top` by total device time, and
    the total per family (attention, matmul, triton, other), in ms per step."""
    with profile(activities=_activities(device)) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    rows = [(k, c, t / 1e3) for k, c, t in gpu_rows(prof)]
    return {"steps": steps, "total_ms_per_step": sum(r[2] for r in rows) / steps,
            "families_ms_per_step": {k: round(v, 4) for k, v in _families(rows, steps).items()},
            "top": [{"kernel": k[:160], "calls_per_step": c / steps, "ms_per_step": round(t / steps, 4)}
                    for k, c, t in rows[:top]],
            "host": host_summary(prof, steps)}


def host_summary(prof, steps: int, top: int = 8) -> dict:
    """The host side of `steps` profiled steps, per step: kernel launches, calls that wait for the GPU
    (synchronizations and copies to the host, HOST_SYNCS) by name, and the host events with the most self
    CPU time (what keeps the host from issuing kernels when the GPU waits on it)."""
    ev = prof.key_averages()
    syncs = {e.key: e.count / steps for e in ev if e.key in HOST_SYNCS}
    hosts = sorted(((e.key, e.count, e.self_cpu_time_total) for e in ev if e.self_cpu_time_total > 0),
                   key=lambda r: -r[2])
    return {"launches_per_step": sum(e.count for e in ev if e.key in KERNEL_LAUNCHES) / steps,
            "syncs_per_step": syncs,
            "self_cpu_ms_per_step": round(sum(r[2] for r in hosts) / 1e3 / steps, 4),
            "top": [{"event": k[:120], "calls_per_step": c / steps, "self_cpu_ms_per_step": round(t / 1e3 / steps, 4)}
                    for k, c, t in hosts[:top]]}


def _profile_call(call: Callable[[torch.Tensor, int], torch.Tensor], ids: torch.Tensor, k: int,
                  device: torch.device) -> tuple[dict[str, tuple[int, float]], dict[str, int]]:
    """One profiled generate call: {kernel: (calls, ms)} and the host's launch calls by name."""
    with profile(activities=_activities(device)) as prof:
        with torch.no_grad():
            call(ids, k)
        synchronize(device)
    rows = gpu_rows(prof) if device.type == "cuda" else cpu_op_rows(prof)
    launches = {e.key: e.count for e in prof.key_averages() if e.key in KERNEL_LAUNCHES + GRAPH_LAUNCHES}
    return {k: (c, t / 1e3) for k, c, t in rows}, launches


def profile_decode(call: Callable[[torch.Tensor, int], torch.Tensor], ids: torch.Tensor, n: int,
                   device: torch.device, top: int = 8) -> dict:
    """The kernels of one decode step through `call` (generate(ids, k) -> tokens): profiled generate with `n`
    new tokens minus generate with 1, per generated token (see the module docstring): kernel time in total and
    by family, kernels per token, the `top` kernels by time with their calls per token; on CUDA also the
    host's kernel launches and CUDA-graph launches per token."""
    if n < 2:
        raise ValueError(f"profile_decode needs >= 2 new tokens (N minus 1), got {n}")
    full, full_launch = _profile_call(call, ids, n, device)
    one, one_launch = _profile_call(call, ids, 1, device)
    per = n - 1
    rows = []
    for k, (c, t) in full.items():
        c1, t1 = one.get(k, (0, 0.0))
        if c > c1:  # runs in the decode steps (the same count in both calls: a prefill kernel)
            rows.append((k, c - c1, t - t1))
    rows.sort(key=lambda r: -r[2])
    out = {"method": "profiled generate(N new) - generate(1 new), per token; prefill excluded",
           "new_tokens": n, "kernels": "gpu kernels (device time)" if device.type == "cuda"
           else "aten ops (self CPU time)",
           "ms_per_token": sum(r[2] for r in rows) / per, "kernels_per_token": sum(r[1] for r in rows) / per,
           "families_ms_per_token": {k: round(v, 6) for k, v in _families(rows, per).items()},
           "top": [{"kernel": k[:160], "calls_per_token": round(c / per, 3), "ms_per_token": round(t / per, 6)}
                   for k, c, t in rows[:top]]}
    if device.type == "cuda":
        def grown(names):
            return sum(full_launch.get(x, 0) - one_launch.get(x, 0) for x in names) / per
        out["launches_per_token"] = grown(KERNEL_LAUNCHES)
        out["graph_launches_per_token"] = grown(GRAPH_LAUNCHES)
        if out["kernels_per_token"] == 0 and out["graph_launches_per_token"] > 0:
            out["note"] = GRAPH_INVISIBLE
    return out
