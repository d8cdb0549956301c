#!/usr/bin/env bash
# `kvshift bench` on the GPU machine (device tool), from the repository root; results land in
# $OUT/bench/<gpu-slug>.json and .md (copy them to results/bench/ to commit).
#
#   KVSHIFT_GIT_COMMIT=$(git rev-parse HEAD) bash scripts/device/bench.sh              # everything, one process
#   KVSHIFT_GIT_COMMIT=... bash scripts/device/bench.sh --only block,decode            # ~1.5 min
#   KVSHIFT_GIT_COMMIT=... bash scripts/device/bench.sh --only e2e                     # ~5-6 min
#
# Estimated on one H200 (torch 2.11): block ~0.5-1 min (Triton JIT + 3 shapes x 3 arms x 45 iterations),
# decode ~1 min (3 bf16 models of bench-246m, two 8k prefills each, 2 x 45 interleaved steps), e2e ~4-6 min
# (2 presets x 3 arms, each a fresh torch.compile of model + loss, ~40-80 s, then 23 steps of 0.1-0.2 s).
# Parts run in the order block, decode, e2e and the JSON/markdown are rewritten after every finished case,
# so a run cut by the timeout keeps what it measured; re-run the rest with --only (the other parts
# of the earlier result in the same --out are kept). Extra arguments go to `kvshift bench`.
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
