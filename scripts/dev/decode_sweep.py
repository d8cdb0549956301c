"""Time the stateless decode kernel against PyTorch's SDPA over the same dense cache, per launch configuration.

    python scripts/dev/decode_sweep.py [--cases 16x2048,128x8192] [--iters 50] [--out FILE]   # on a CUDA GPU

One decode step's attention for bench-246m's shape (16 query heads, 4 KV heads, head dim 64, bf16): a dense
cache of rotated raw keys and raw values (B, 4, S, 64), as transformers' caches hold them. The baseline is what
a vanilla model's step runs on the same tensors: `F.scaled_dot_product_attention` of one query per row with
the grouped heads (`enable_gqa`). Each configuration of `dense_shift_decode` (key tile `block`, `num_splits`,
`num_warps`, `num_stages`) is timed in the same process: 20 calls captured in a CUDA graph, replayed
between CUDA events (the median of `--iters` replays, after a warm-up). Its output is checked against the
PyTorch read (`kvshift.layers.stateless.read_shifted` plus SDPA) before it is timed. Prints one line per
configuration, fastest first, with its ratio to SDPA and its effective bandwidth (the cache bytes one call
must read, over its time). A diagnostic for tuning the kernel's defaults; the benchmark (`kvshift bench --only
generate --profile`) measures the step as a model runs it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

from kvshift.bench.timing import graph_time_ms

HQ, HKV, D, W = 16, 4, 64, 2


# 36 compiles per case; 3 stages: Triton's own default (the launcher's default is DEFAULT_STAGES, 2)
CONFIGS = list(itertools.product((32, 64, 128), ("auto", "2auto"), (4, 8), (2, 3, 4)))


def sweep(B: int, S: int, iters: int, *, device: str = "cuda", configs=CONFIGS) -> list[dict]:
    """One row per configuration (block, splits, num_warps, num_stages) and one for SDPA; splits "auto" is the
    launcher's default, "2auto" twice it, or a number."""
    from kvshift.layers.stateless import read_shifted, rotation_tables
    from kvshift.ops.shift.paged_decode import dense_shift_decode

    cuda = device == "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    bf = dict(device=device, dtype=torch.bfloat16)
    C = torch.randn(B, HKV, S, D, generator=g, **bf)
    V = torch.randn(B, HKV, S, D, generator=g, **bf)
    q = torch.randn(B, HQ, D, generator=g, **bf)
    ck = torch.tensor([[0.7, 0.3]] * HKV, device=device)
    cv = torch.tensor([[0.6, 0.4]] * HKV, device=device)
    cos, sin = rotation_tables(W - 1, D, 10_000.0, device=device, dtype=torch.float32)
    start = torch.zeros(B, dtype=torch.int32, device=device)
    seq = torch.full((B,), S, dtype=torch.int32, device=device)
    pos = torch.arange(S, device=device).view(1, S).expand(B, S)
    K, Vh = read_shifted(C.float(), V.float(), ck, cv, pos, cos, sin)
    want = F.scaled_dot_product_attention(q.float()[:, :, None], K, Vh, enable_gqa=True)[:, :, 0]
    bytes_read = 2 * C.numel() * C.element_size()
    base = graph_time_ms(lambda: F.scaled_dot_product_attention(q[:, :, None], C, V, enable_gqa=True), iters,
                         cuda)
    rows = [{"case": f"{B}x{S}", "config": "sdpa (vanilla's read, no shift)", "ms": base, "ratio": 1.0,
             "TB/s": bytes_read / base / 1e9}]
    auto = max(1, -(-264 // (B * HKV))) if cuda else 1  # the launcher's default
    seen = set()
    for block, splits, warps, stages in configs:
        splits = {"auto": auto, "2auto": 2 * auto}.get(splits) or int(splits)
        if (block, splits, warps, stages) in seen:
            continue
        seen.add((block, splits, warps, stages))
        kw = dict(block=block, num_splits=splits, num_warps=warps, num_stages=stages)
        try:
            got = dense_shift_decode(q, C, V, start, seq, ck, cv, cos, sin, **kw)
        except Exception as e:  # noqa: BLE001 (a configuration the compiler rejects, e.g. shared memory)
            rows.append({"case": f"{B}x{S}", "config": json.dumps(kw), "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        err = (got.float() - want).abs().max().item()
        if err > 5e-2:
            rows.append({"case": f"{B}x{S}", "config": json.dumps(kw), "error": f"max error {err:.3g}"})
            continue
        try:
            ms = graph_time_ms(lambda: dense_shift_decode(q, C, V, start, seq, ck, cv, cos, sin, **kw), iters,
                               cuda)
        except Exception as e:  # noqa: BLE001 (e.g. a capture the configuration breaks): the others still run
            rows.append({"case": f"{B}x{S}", "config": json.dumps(kw),
                         "error": f"timing: {type(e).__name__}: {e}"[:200]})
            continue
        rows.append({"case": f"{B}x{S}", "config": json.dumps(kw), "ms": ms, "ratio": ms / base,
                     "TB/s": bytes_read / ms / 1e9, "max_err": err})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="16x2048,128x8192", help="comma-separated BATCHxCONTEXT")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=None, help="also write the rows as JSON to this file")
    a = ap.parse_args(argv)
    try:
        cases = [tuple(int(x) for x in c.split("x")) for c in a.cases.split(",")]
    except ValueError:
        cases = []
    if not cases or not all(len(c) == 2 and min(c) > 0 for c in cases):
        print(f"decode_sweep: --cases must look like 16x2048,128x8192, got {a.cases!r}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("decode_sweep: needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for B, S in cases:
        case = sweep(B, S, a.iters)
        rows += case
        for r in sorted(case, key=lambda r: r.get("ms", float("inf"))):
            if "error" in r:
                print(f"{r['case']:>10}  {r['config']:<70}  {r['error']}")
            else:
                print(f"{r['case']:>10}  {r['config']:<70}  {r['ms']:.4f} ms  x{r['ratio']:.2f}  "
                      f"{r['TB/s']:.2f} TB/s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
