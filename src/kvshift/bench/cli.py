"""`kvshift bench`: the one-process benchmark of the fused-kernel issue (see kvshift.bench.run)."""

from __future__ import annotations

import os
import sys

import torch

# None of these defines the Triton kernels at import: `kvshift.ops.shift.triton_available()` imports them
# at first use (in run_bench), after `_run` has set TRITON_INTERPRET on a CPU machine.
from kvshift.bench.generate import parse_cases
from kvshift.bench.plan import DEFAULT_PARTS, E2E_ARMS, E2E_MORE, E2E_MORE_QUICK, MIXER_ARMS, PARTS, Plan
from kvshift.bench.report import GEN_ARMS
from kvshift.bench.report import render_markdown
from kvshift.bench.run import merge_results, run_bench


def _parts(s: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in s.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"--only takes a comma-separated subset of {','.join(PARTS)}, got {s!r}")
    return parts


def _run(args) -> int:
    if args.merge:
        res = merge_results(args.merge, args.out)
        print(render_markdown(res))
        print(f"merged {len(args.merge)} results into {args.out}/{res['meta']['device_slug']}.json and .md")
        return 0

    cuda = torch.cuda.is_available()
    if not cuda:
        # the fused kernels then run through Triton's interpreter (must be set before they are defined)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    quick = args.quick
    if not cuda and not quick:
        sys.stderr.write("kvshift bench: no CUDA device, running the --quick plan (tiny shapes; not for committing)\n")
        quick = True
    plan = Plan.quick_plan(cuda) if quick else Plan.full()
    plan.with_steps(args.steps, args.warmup)
    if not quick and min(plan.block_iters, plan.e2e_iters, plan.decode_iters) < 20:
        sys.stderr.write("kvshift bench: fewer than 20 timed iterations: medians are noisier than the issue asks\n")
    plan.parts = _parts(args.only) if args.only else DEFAULT_PARTS
    if args.peak_flops is not None:
        if args.peak_flops <= 0:
            raise ValueError(f"--peak-flops must be positive, got {args.peak_flops}")
        plan.peak_flops = args.peak_flops
    plan.profile = bool(args.profile)
    if args.models:
        want = [m.strip() for m in args.models.split(",") if m.strip()]
        more = E2E_MORE_QUICK if plan.quick else E2E_MORE
        known = [m[0] for m in plan.e2e_models] + list(more)
        bad = [m for m in want if m not in known]
        if bad or not want:
            raise ValueError(f"--models takes a comma-separated subset of {','.join(known)}, got {args.models!r}")
        plan.e2e_models = ([m for m in plan.e2e_models if m[0] in want]
                           + [(k, *more[k]) for k in want if k in more])
    if args.e2e_arms:
        arms = tuple(a.strip() for a in args.e2e_arms.split(",") if a.strip())
        known = E2E_ARMS + MIXER_ARMS
        bad = [a for a in arms if a not in known]
        if bad or not arms:
            raise ValueError(f"--e2e-arms takes a comma-separated subset of {','.join(known)}, got {args.e2e_arms!r}")
        plan.e2e_arms = arms
    if args.gen_cases:
        plan.gen_cases = parse_cases(args.gen_cases)
    if args.gen_arms:
        arms = tuple(a.strip() for a in args.gen_arms.split(",") if a.strip())
        bad = [a for a in arms if a not in GEN_ARMS]
        if bad or not arms:
            raise ValueError(f"--gen-arms takes a comma-separated subset of {','.join(GEN_ARMS)}, got {args.gen_arms!r}")
        plan.gen_arms = arms
    if args.gen_iters is not None:
        if args.gen_iters < 1:
            raise ValueError(f"--gen-iters must be >= 1, got {args.gen_iters}")
        plan.gen_iters = args.gen_iters
    if args.new_tokens is not None:
        if args.new_tokens < 2:
            raise ValueError(f"--new-tokens must be >= 2, got {args.new_tokens}")
        plan.gen_new_tokens = args.new_tokens
    if args.attn_grad:
        plan.attn_grad = args.attn_grad
    if args.no_graph:
        plan.attn_graph = False
    if args.families:
        fams = tuple(f.strip() for f in args.families.split(",") if f.strip())
        if not fams or any(f not in ("cudnn", "flash", "math") for f in fams):
            raise ValueError(f"--families takes a comma-separated subset of cudnn,flash,math, got {args.families!r}")
        plan.attn_families = fams
    if args.modes:
        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        if not modes or any(m not in ("eager", "compiled") for m in modes):
            raise ValueError(f"--modes takes a comma-separated subset of eager,compiled, got {args.modes!r}")
        plan.block_modes = modes
    res = run_bench(plan, args.out)
    slug = res["meta"]["device_slug"]
    print(render_markdown(res))
    s = res["summary"]
    print(f"targets: {s['met']} met, {s['missed']} missed, {s['unknown']} without data")
    print(f"results: {os.path.join(args.out, slug + '.json')} and .md")
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="vanilla vs kvshift: attention block as a model runs it, generate, training step")
    p.add_argument("--only", default=None,
                   help="comma-separated parts: attn,generate,e2e (the default) or the superseded block,decode")
    p.add_argument("--e2e-arms", default=None,
                   help="e2e part: comma-separated arms (default: vanilla and the shift arms); the short mixers "
                        "dconv,canon,keyoffset,smear measure what each costs beside vanilla")
    p.add_argument("--gen-cases", default=None,
                   help="generate cases BATCHxPROMPT, comma-separated, a trailing p for left-padded prompts of "
                        "different lengths (default 1x2048,16x2048,128x2048,1x8192,16x8192,128x8192)")
    p.add_argument("--gen-arms", default=None, help="comma-separated generate arms (default: all; see kvshift.bench.generate)")
    p.add_argument("--gen-iters", type=int, default=None, help="timed generate calls per arm and case (default 3)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per call (default 128)")
    p.add_argument("--attn-grad", choices=("tensor", "wo"), default=None,
                   help="attn part: a (B, T, H*D) output gradient (default) or the gradient through a real wo")
    p.add_argument("--no-graph", action="store_true", help="attn part: skip the CUDA-graph timing")
    p.add_argument("--families", default=None, help="attn part: attention kernel families, e.g. cudnn,flash (default)")
    p.add_argument("--modes", default=None, help="attn and block parts: eager,compiled (default both on CUDA)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed iterations per measurement (default: 40 block, 20 e2e, 40 decode; quick: 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default: 5 block, 3 e2e, 5 decode)")
    p.add_argument("--out", default="results/bench", help="directory for <gpu-slug>.json and .md")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few iterations (CPU, smoke tests)")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="peak bf16 FLOP/s for MFU (default: by device name, 989e12 for H100/H200)")
    p.add_argument("--models", default=None,
                   help="comma-separated e2e models to run (default: the plan's bench-162m, bench-246m); also "
                        "bench-1b, bench-162m-packed, bench-246m-packed, bench-246m-16k (only when named)")
    p.add_argument("--profile", action="store_true",
                   help="also profile each arm after its timing (torch.profiler): e2e, the top GPU kernels of "
                        "2 training steps; generate, the kernels of one decode step (profiled generate with a few "
                        "new tokens minus generate with 1, per token: time by family, top kernels, kernels and "
                        "launches per token); on a CPU aten ops stand in for kernels")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge result files of one device (parts run on separate GPUs) into --out; runs nothing "
                        "(one file: its targets and markdown written again)")
    p.set_defaults(func=_run)
