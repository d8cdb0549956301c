#!/usr/bin/env bash
# Multi-GPU throughput of `kvshift train` (device tool, kind nvidia-h200-x2 or larger), from the repo root,
# with the LM shards in $SHARDS (default cache/lm-shards; scripts/device/batch.sh unpacks the pack):
#   bash scripts/device/scaling.sh [CONFIG] [STEPS] [EXTRA --set ARGS...]
# Weak scaling: the same per-GPU batch on 1 GPU, then 2 GPUs with DDP, then 2 GPUs with FSDP2 (`--fsdp`),
# each a fresh compiled run of STEPS steps (default 60; the summary's tokens_per_s leaves out the first
# steps, compilation included). Each run's summary.json and metrics.jsonl go to $OUT/scaling/<mode>/;
# then, here: `kvshift experiment pipeline --scale gpu --input scaling=DIR/scaling` writes results/pipeline-gpu/scaling.*
# Without a GPU the same runs go to the CPU with gloo (a smoke test of this script: tests/test_pipeline.py).
set -u
CONFIG=${1:-lm-50m}; STEPS=${2:-60}; shift $(( $# < 2 ? $# : 2 ))
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; SH=${SHARDS:-$PWD/cache/lm-shards}; PY=${PYTHON:-python3}
[ -f "$SH/meta.json" ] || { echo "no shards (meta.json) in $SH" >&2; exit 1; }
sets=()
for kv in "data.kind=\"shards\"" "data.shard_dir=\"$SH\"" "train.steps=$STEPS" "train.eval_every=0" "train.eval_batches=2" \
          "train.ckpt_every=0" "train.log_every=5" "train.progress=false" "$@"; do sets+=(--set "$kv"); done
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
echo "== $CONFIG, $STEPS steps, ${ngpu:-0} GPU(s) visible"
rc=0
run() {  # MODE NPROC [train args]
  local mode=$1 n=$2; shift 2
  local dir=${SCALING_RUNS:-/tmp/scaling}/$mode; rm -rf "$dir"; mkdir -p "$OUT/scaling/$mode"
  echo "== $mode ($n process(es)) $(date +%T)"
  if [ "$n" -eq 1 ]; then
    "$PY" -m kvshift.cli train "$CONFIG" --out "$dir" "${sets[@]}" "$@" > "$OUT/scaling/$mode/log" 2>&1
  else
    "$PY" -m torch.distributed.run --standalone --nproc_per_node="$n" -m kvshift.cli train "$CONFIG" --out "$dir" \
      "${sets[@]}" "$@" > "$OUT/scaling/$mode/log" 2>&1
  fi
  local r=$?; [ $r -eq 0 ] || { rc=$r; echo "== $mode failed (exit $r):"; tail -n 15 "$OUT/scaling/$mode/log"; return; }
  cp "$dir/summary.json" "$dir/metrics.jsonl" "$OUT/scaling/$mode/"
  "$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print('  tokens/s', round(s['tokens_per_s']), 'mfu', s.get('mfu'), 'world', s.get('world_size'), s.get('parallel'))" "$dir/summary.json"
}
run 1gpu 1
run 2gpu-ddp 2
run 2gpu-fsdp2 2 --fsdp
exit $rc
