"""Timing: warm-up, then timed iterations with arms interleaved round by round.

On CUDA every iteration is bracketed by CUDA events (GPU time, no host sync between iterations);
on CPU by time.perf_counter. Arms run in a rotated order each round, so no arm always runs first
(right after a sync) or last; every arm sees the same clocks, allocator state and settings.
"""

from __future__ import annotations

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
