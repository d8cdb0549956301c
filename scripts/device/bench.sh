#!/usr/bin/env bash
# `kvshift bench` on the GPU machine (device tool), from the repository root; results land in
# $OUT/bench/<gpu-slug>.json and .md (copy them to results/bench/ to commit).
#
#   KVSHIFT_GIT_COMMIT=$(git rev-parse HEAD) bash scripts/device/bench.sh --only attn --families cudnn   # ~5 min
#   KVSHIFT_GIT_COMMIT=... bash scripts/device/bench.sh --only attn --families flash                   # ~5 min
#   KVSHIFT_GIT_COMMIT=... bash scripts/device/bench.sh --only generate --gen-cases 1x2048,16x2048     # ~4-6 min
#   KVSHIFT_GIT_COMMIT=... bash scripts/device/bench.sh --only e2e                                     # ~5-6 min
# The whole default plan (attn, generate, e2e) does not fit one 10-minute call: docs/gpu.md ("The benchmark")
# splits it over GPUs and calls, and merges the results here with `kvshift bench --merge`.
# Parts run in the order attn, block, decode, generate, e2e and the JSON/markdown are rewritten after every
# finished case, so a run cut by the timeout keeps what it measured; re-run the rest with --only (the other
# parts of an earlier result in the same --out are kept). Extra arguments go to `kvshift bench`.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/bench"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout "${BENCH_TIMEOUT:-570}" python3 -m kvshift.cli bench --out "$OUT/bench" "$@"
rc=$?
[ "$rc" -eq 124 ] && echo "== bench cut by the ${BENCH_TIMEOUT:-570}s timeout: partial results in $OUT/bench (re-run the rest with --only)"
ls -l "$OUT/bench"
exit "$rc"
