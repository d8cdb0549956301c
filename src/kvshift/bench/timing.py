"""Timing: warm-up, then timed iterations with arms interleaved round by round.

On CUDA every iteration is bracketed by CUDA events (GPU time, no host sync between iterations);
on CPU by time.perf_counter. Arms run in a rotated order each round, so no arm always runs first
(right after a sync) or last; every arm sees the same clocks, allocator state and settings.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list, like numpy's default."""
    if not values:
        raise ValueError("values must be non-empty")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(times_ms: list[float]) -> dict:
    return {
        "median_ms": percentile(times_ms, 50),
        "p10_ms": percentile(times_ms, 10),
        "p90_ms": percentile(times_ms, 90),
        "mean_ms": sum(times_ms) / len(times_ms),
        "n": len(times_ms),
        "times_ms": [round(t, 4) for t in times_ms],
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: dict[str, Callable[[], object]], *, warmup: int, iters: int,
            device: torch.device) -> dict[str, dict]:
    """Run every arm `warmup` times, then `iters` timed rounds (each arm once per round, order
    rotated). Returns {arm: summarize(times)} in milliseconds."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    synchronize(device)
    cuda = device.type == "cuda"
    times: dict[str, list[float]] = {n: [] for n in names}
    events: dict[str, list] = {n: [] for n in names}
    for i in range(iters):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[n]()
                end.record()
                events[n].append((start, end))
            else:
                t0 = time.perf_counter()
                fns[n]()
                times[n].append((time.perf_counter() - t0) * 1e3)
    synchronize(device)
    if cuda:
        times = {n: [s.elapsed_time(e) for s, e in events[n]] for n in names}
    return {n: summarize(times[n]) for n in names}


def measure_modes(fns: dict[str, Callable[[], object]], *, warmup: int, iters: int, rounds: int,
                  device: torch.device) -> dict[str, dict]:
    """Two timings of every arm (arms interleaved, order rotated):

    sync: each iteration on its own, host clock around `fn(); synchronize()`: latency, launch overhead
          included (what a caller that waits for the result sees);
    b2b:  `iters` iterations back to back between two CUDA events (perf_counter + one synchronize on a
          CPU), per iteration, `rounds` times: GPU time where the GPU is the bottleneck, the launch rate
          where the host is.
    Returns {arm: {"sync": summarize(...), "b2b": summarize(per-iteration ms of each round)}}."""
    if iters < 1 or rounds < 1:
        raise ValueError(f"iters and rounds must be >= 1, got {iters}, {rounds}")
    names = list(fns)
    for _ in range(max(warmup, 0)):
        for n in names:
            fns[n]()
    synchronize(device)
    sync: dict[str, list[float]] = {n: [] for n in names}
    for i in range(iters):
        for n in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            synchronize(device)
            sync[n].append((time.perf_counter() - t0) * 1e3)
    b2b: dict[str, list[float]] = {n: [] for n in names}
    cuda = device.type == "cuda"
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            synchronize(device)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fns[n]()
                end.record()
                end.synchronize()
                b2b[n].append(start.elapsed_time(end) / iters)
            else:
                t0 = time.perf_counter()
                for _ in range(iters):
                    fns[n]()
                b2b[n].append((time.perf_counter() - t0) * 1e3 / iters)
    return {n: {"sync": summarize(sync[n]), "b2b": summarize(b2b[n])} for n in names}


def graph_time_ms(fn: Callable[[], object], iters: int, cuda: bool, reps: int = 20) -> float:
    """Median milliseconds of one call of `fn`, for a kernel-tuning diagnostic (scripts/dev). On CUDA: `reps`
    calls captured in one CUDA graph and replayed between CUDA events, so the host's Python work per call (a
    launcher's small tensors) is not timed and a 50-microsecond kernel is measured as the GPU runs it; a wall
    clock off CUDA."""
    fn()
    if not cuda:
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
        return statistics.median(times)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (allocations, autotuning, compiles)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    return statistics.median(times)
