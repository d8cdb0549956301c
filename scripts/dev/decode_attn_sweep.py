"""Time the static decode step's attention (one token per row against the whole cache allocation) per layout.

    python scripts/dev/decode_attn_sweep.py [--batches 1,16,128] [--slots 2176,8320] [--out FILE]   # CUDA GPU

`LM.generate(compile=True)` attends one new token per row over the cache's whole allocation (S slots, a
validity mask hiding unwritten and pad slots). With GQA the layer can hand SDPA its query heads in two
layouts: a KV group's query heads as the query rows of one (B, Hkv, H/Hkv, D) call ("rows", no copy of the
cache), or one query row per head (B, H, 1, D) against the cache's Hkv heads with `enable_gqa` ("heads-gqa")
or with the cache repeated per query head ("heads-repeat", a copy of it per step). Which attention kernel
PyTorch picks, and how well it fills the GPU, depends on that layout: at batch 1 "rows" gives the kernel
B * Hkv programs over an 8k-slot cache. "scores": the plain matmul-softmax-matmul, fp32 softmax. Each
layout under each SDPA backend that takes it is checked against the math backend's output, then timed: 20
calls in a CUDA graph replayed between CUDA events (`kvshift.bench.timing.graph_time_ms`), GPU time per
call. The shape is bench-246m's (16 query heads, 4 KV heads, head dim 64), bf16. A diagnostic: the bench's
generate part measures the step through `LM.generate`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch
import torch.nn.functional as F

from kvshift.bench.timing import graph_time_ms

H, G, D = 16, 4, 64


def _inputs(B: int, S: int, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    bf = dict(device=device, dtype=torch.bfloat16)
    q = torch.randn(B, H, D, generator=g, **bf)
    k = torch.randn(B, S, G, D, generator=g, **bf)  # the cache's layout: (B, S, Hkv, D)
    v = torch.randn(B, S, G, D, generator=g, **bf)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool, device=device)
    mask[..., S - 100:] = False  # unwritten slots at the end of the allocation
    return q, k, v, mask


def layouts(q, k, v, mask):
    """name -> fn(backend) -> (B, H, D) output, each layout's own reshapes included in the call."""
    B, S = k.shape[:2]
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (B, G, S, D) views, as the layer passes them

    def rows(be):
        with be():
            out = F.scaled_dot_product_attention(q.view(B, G, H // G, D), kt, vt, attn_mask=mask)
        return out.reshape(B, H, D)

    def heads_gqa(be):
        with be():
            out = F.scaled_dot_product_attention(q.view(B, H, 1, D), kt, vt, attn_mask=mask, enable_gqa=True)
        return out.reshape(B, H, D)

    def heads_repeat(be):
        kr, vr = kt.repeat_interleave(H // G, dim=1), vt.repeat_interleave(H // G, dim=1)
        with be():
            out = F.scaled_dot_product_attention(q.view(B, H, 1, D), kr, vr, attn_mask=mask)
        return out.reshape(B, H, D)

    def scores(be):
        s = torch.matmul(q.view(B, G, H // G, D), kt.transpose(-1, -2)).float() * D ** -0.5
        p = s.masked_fill(~mask, float("-inf")).softmax(-1).to(q.dtype)
        return torch.matmul(p, vt).reshape(B, H, D)

    return {"rows": rows, "heads-gqa": heads_gqa, "heads-repeat": heads_repeat, "scores": scores}


def _backends():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {"default": contextlib.nullcontext}
    for name in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        if hasattr(SDPBackend, name):
            out[name.split("_")[0].lower()] = (lambda b: (lambda: sdpa_kernel(b)))(getattr(SDPBackend, name))
    return out


def sweep(B: int, S: int, iters: int, device: str = "cuda") -> list[dict]:
    q, k, v, mask = _inputs(B, S, device)
    backends = _backends()
    fns = layouts(q, k, v, mask)
    want = fns["heads-repeat"](backends["math"]).float()
    rows = []
    for lname, fn in fns.items():
        for bname, be in (backends.items() if lname != "scores" else [("none", backends["default"])]):
            row = {"batch": B, "slots": S, "layout": lname, "backend": bname}
            try:
                got = fn(be).float()
                err = (got - want).abs().max().item()
                if err > 2e-2 * want.abs().max().item():  # bf16 rounding, relative to the output's size
                    rows.append({**row, "error": f"differs from the math reference by {err:.3g}"})
                    continue
                ms = graph_time_ms(lambda: fn(be), iters, device == "cuda")
            except Exception as e:  # noqa: BLE001 (a backend that does not take this layout)
                rows.append({**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"[:160]})
                continue
            rows.append({**row, "ms": ms, "max_err": err})
    return rows


def _ints(s: str, name: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise ValueError(f"{name} takes comma-separated positive integers, got {s!r}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,16,128")
    ap.add_argument("--slots", default="2176,8320", help="cache allocations (prompt + new tokens, rounded to 128)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default=None, help="also write the rows as JSON to this file")
    a = ap.parse_args(argv)
    try:
        batches, slots = _ints(a.batches, "--batches"), _ints(a.slots, "--slots")
    except ValueError as e:
        print(f"decode_attn_sweep: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("decode_attn_sweep: needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for S in slots:
        for B in batches:
            case = sweep(B, S, a.iters)
            rows += case
            for r in sorted(case, key=lambda r: r.get("ms", float("inf"))):
                what = r["error"] if "error" in r else f"{r['ms'] * 1e3:8.1f} us"
                print(f"B{B:<4} S{S:<6} {r['layout']:<13} {r['backend']:<9} {what}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
