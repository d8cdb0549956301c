"""Time the training op's K+V shift kernels per launch configuration, against a copy of the same bytes.

    python scripts/dev/shift_sweep.py [--cases 162m,246m,1b] [--iters 50] [--out FILE]   # on a CUDA GPU

The one op (`kvshift.ops.shift.attention`) runs two Triton kernels per layer and training step besides the
attention: `shift_kv_fwd_kernel` (RoPE(shift(K)) and shift(V) in one launch; twice, the forward and the
recompute before the attention backward) and `shift_kv_bwd_kernel` (dK, dV and the coefficient grads' partial
sums, then one reduction). Their time is the e2e step's whole excess over vanilla's at equal memory (the
benchmark's profile of bench-162m), so how close they run to the memory bandwidth decides that ratio. For each
case (the benchmark presets' per-layer shapes, bf16), each configuration (rows per program `block_t`,
`num_warps`) of both launchers is checked against the default configuration's outputs (K̂, V̂, dK, dV to one
bf16 rounding; the coefficient grads to a relative 1e-3: the partial sums' order changes with the row block),
then timed: 20
calls captured in a CUDA graph, replayed between CUDA events (`kvshift.bench.timing.graph_time_ms`). The
reference is a copy of the bytes each kernel must move at least (forward: read K and V, write K̂ and V̂;
backward: read dK̂, dV̂, K and V, write dK and dV), as `torch.Tensor.copy_` moves them. Prints one line per
configuration, fastest first, with its effective bandwidth and its ratio to the default. A diagnostic for
tuning the kernels' defaults; the benchmark (`kvshift bench --only e2e --profile`) measures the step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from kvshift.bench.timing import graph_time_ms

# per-layer K/V shapes of the benchmark presets: (batch, tokens, KV heads, head dim)
CASES = {"162m": (32, 1024, 12, 64), "246m": (16, 2048, 4, 64), "1b": (4, 4096, 4, 128)}
CONFIGS = list(itertools.product((None, 16, 32, 64, 128), (None, 2, 4, 8)))  # (block_t, num_warps); None: default


def _inputs(B: int, T: int, H: int, D: int, device: str):
    from kvshift.ops.rope import rope_cos_sin

    g = torch.Generator(device=device).manual_seed(0)
    bf = dict(device=device, dtype=torch.bfloat16)
    k, v, dk_hat, dv_hat = (torch.randn(B, T, H, D, generator=g, **bf) for _ in range(4))
    w_k = torch.tensor([[0.7, 0.3]] * H, device=device)
    w_v = torch.tensor([[0.6, 0.4]] * H, device=device)
    cos, sin = rope_cos_sin(torch.arange(T, device=device).view(1, T), D)
    return k, v, dk_hat, dv_hat, w_k, w_v, cos, sin


def sweep(name: str, shape: tuple[int, int, int, int], iters: int, *, device: str = "cuda",
          configs=CONFIGS) -> list[dict]:
    """One row per (kernel, configuration) and one per kernel for the copy of its bytes."""
    from kvshift.ops.shift.triton import launch_shift_kv_bwd, launch_shift_kv_fwd

    cuda = device == "cuda"
    k, v, dk_hat, dv_hat, w_k, w_v, cos, sin = _inputs(*shape, device=device)
    fwd = lambda **kw: launch_shift_kv_fwd(k, v, w_k, w_v, None, cos, sin, **kw)  # noqa: E731
    bwd = lambda **kw: launch_shift_kv_bwd(dk_hat, dv_hat, k, v, w_k, w_v, None, cos, sin, **kw)  # noqa: E731
    want = {"fwd": fwd(), "bwd": bwd()}
    size = k.numel() * k.element_size()
    src = torch.empty(3, *k.shape, device=device, dtype=k.dtype)
    dst = torch.empty_like(src)
    rows = []
    for kernel, fn, n_read, n_write in (("fwd", fwd, 2, 2), ("bwd", bwd, 4, 2)):
        moved = (n_read + n_write) * size
        n = n_read // 2  # a copy of n_read/2 + n_write/2 tensor pairs moves the same bytes
        copy_ms = graph_time_ms(lambda: dst[:n + n_write // 2].copy_(src[:n + n_write // 2]), iters, cuda)
        rows.append({"case": name, "kernel": kernel, "config": "copy of the same bytes", "ms": copy_ms,
                     "TB/s": moved / copy_ms / 1e9})
        default = None
        for block_t, warps in configs:
            kw = {k_: v_ for k_, v_ in (("block_t", block_t), ("num_warps", warps)) if v_ is not None}
            row = {"case": name, "kernel": kernel, "config": json.dumps(kw) if kw else "default"}
            try:
                got = fn(**kw)
            except Exception as e:  # noqa: BLE001 (a configuration the compiler rejects)
                rows.append({**row, "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            bad = _mismatch(kernel, got, want[kernel])
            if bad:
                rows.append({**row, "error": bad})
                continue
            try:
                ms = graph_time_ms(lambda: fn(**kw), iters, cuda)
            except Exception as e:  # noqa: BLE001 (e.g. a capture the configuration breaks): the others still run
                rows.append({**row, "error": f"timing: {type(e).__name__}: {e}"[:200]})
                continue
            default = ms if not kw else default
            rows.append({**row, "ms": ms, "TB/s": moved / ms / 1e9, "vs_copy": ms / copy_ms})
        for r in rows:
            if r["kernel"] == kernel and "vs_copy" in r and default:
                r["vs_default"] = r["ms"] / default
    return rows


def _mismatch(kernel: str, got, want) -> str | None:
    """Why `got` differs from the default configuration's outputs, or None."""
    tensors = got if kernel == "fwd" else got[:2]
    for i, (a, b) in enumerate(zip(tensors, want)):  # the same arithmetic per element; one bf16 rounding apart
        if not torch.allclose(a.float(), b.float(), rtol=8e-3, atol=1e-3):
            return f"output {i} differs from the default's by {(a.float() - b.float()).abs().max().item():.3g}"
    if kernel == "bwd" and not torch.allclose(got[2], want[2], rtol=1e-3, atol=1e-3):
        return f"coefficient grads differ from the default's by {(got[2] - want[2]).abs().max().item():.3g}"
    return None


def _parse(cases: str) -> list[tuple[str, tuple[int, int, int, int]]]:
    out = []
    for c in (x.strip() for x in cases.split(",")):
        if c in CASES:
            out.append((c, CASES[c]))
            continue
        parts = c.split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts) or int(parts[3]) % 2:
            raise ValueError(c)
        out.append((c, tuple(int(p) for p in parts)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="162m,246m,1b",
                    help=f"comma-separated presets ({', '.join(CASES)}) or BxTxHxD (even D)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=None, help="also write the rows as JSON to this file")
    a = ap.parse_args(argv)
    try:
        cases = _parse(a.cases)
    except ValueError as e:
        print(f"shift_sweep: --cases takes {', '.join(CASES)} or BxTxHxD with an even D, got {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("shift_sweep: needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for name, shape in cases:
        case = sweep(name, shape, a.iters)
        rows += case
        for r in sorted(case, key=lambda r: (r["kernel"], r.get("ms", float("inf")))):
            if "error" in r:
                print(f"{r['case']:>6} {r['kernel']}  {r['config']:<34}  {r['error']}")
            else:
                extra = f"  x{r['vs_default']:.3f} of default" if "vs_default" in r else ""
                print(f"{r['case']:>6} {r['kernel']}  {r['config']:<34}  {r['ms']:.4f} ms  "
                      f"{r['TB/s']:.2f} TB/s{extra}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
