"""Eager decoding of left-padded batches through `LM.generate`, per masked-GQA layout, in one process.

    python scripts/dev/padded_decode_layouts.py [--cases 16x2048p,16x8192p] [--rounds 2] [--out FILE]   # CUDA GPU

A left-padded batch decodes under a mask, and SDPA's kernels that take a mask did not all take `enable_gqa`,
so the layer used to repeat the cache's K/V to every query head on every step ("repeat"). It now passes them
as they are where SDPA's dispatcher picks cuDNN for the call ("native", `kvshift.layers.gqa`). This times the
generate part's lm-vanilla and lm-kvshift arms (`kvshift.bench.generate.bench_generate`, bench-246m, 128 new
tokens, ms per generated token) with the dispatcher's answer forced to no (the old layout) and as it is, once
each per round, the order swapped from one round to the next (repeat, native, native, repeat, ...) so that
neither layout is always timed first and a drift of the host's speed falls on both; use an even --rounds. A
diagnostic: the bench's generate part measures the shipped layout (its padded cases).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import kvshift.layers.gqa as gqa
from kvshift.bench.generate import bench_generate, parse_cases
from kvshift.bench.plan import Plan

ARMS = ("lm-vanilla", "lm-kvshift")


def run(cases: list[tuple], rounds: int, device: str = "cuda", model: str = "bench-246m", new_tokens: int = 128,
        iters: int = 3) -> list[dict]:
    plan = Plan.full()
    plan.gen_model, plan.gen_cases, plan.gen_arms, plan.gen_compile = model, cases, ARMS, False
    plan.gen_new_tokens, plan.gen_iters = new_tokens, iters
    real = gqa.cudnn_picked
    rows = []
    for r in range(rounds):
        for layout in (("repeat", "native") if r % 2 == 0 else ("native", "repeat")):
            gqa._CHOICES.clear()
            gqa.cudnn_picked = real if layout == "native" else (lambda q, k, mask: False)
            try:
                sec = bench_generate(plan, torch.device(device), lambda u: None)
            finally:
                gqa.cudnn_picked = real
            picked = sorted({bool(v) for v in gqa._CHOICES.values()})
            for name, c in sec.get("cases", {}).items():
                for arm, res in c["arms"].items():
                    rows.append({"round": r, "layout": layout, "case": name, "arm": arm, "native_picked": picked,
                                 **({"error": res["error"]} if "error" in res else
                                    {"ms_per_token": res["ms_per_token"]})})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="16x2048p,16x8192p", help="generate cases (kvshift bench --gen-cases)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the rows as JSON to this file")
    a = ap.parse_args(argv)
    try:
        cases = parse_cases(a.cases)
    except ValueError as e:
        print(f"padded_decode_layouts: --cases: {e}", file=sys.stderr)
        return 2
    if a.rounds < 1:
        print(f"padded_decode_layouts: --rounds must be >= 1, got {a.rounds}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("padded_decode_layouts: needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = run(cases, a.rounds)
    for r in rows:
        what = r.get("error") or f"{r['ms_per_token']:.3f} ms/token"
        print(f"round {r['round']} {r['layout']:<7} {r['case']:<18} {r['arm']:<11} {what}  picked {r['native_picked']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
