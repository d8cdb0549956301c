#!/usr/bin/env bash
# Multi-GPU throughput of `kvshift train` on the GPU machine (device tool, kind nvidia-h200-x2 or larger),
# from the repository root, with the LM shards in $KVSHIFT_SHARDS (scripts/device/lm.sh unpacks them):
#   bash scripts/device/scaling.sh [CONFIG] [STEPS]
# Weak scaling: the same per-GPU batch (64 x 1024) on 1 GPU, then 2 GPUs with DDP, then 2 GPUs with
# FSDP2 (`--fsdp`), each a fresh compiled run of STEPS steps (default 60; the summary's tokens_per_s
# leaves out the first steps, compilation included). Each run's summary.json and metrics.jsonl land in
# $OUT/scaling/<mode>/; `python -m kvshift.train.scaling summarize DIR` writes results/pipeline/scaling.*.
set -u
CONFIG=${1:-lm-50m}; STEPS=${2:-60}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; SH=${KVSHIFT_SHARDS:-$PWD/cache/lm-shards}
[ -f "$SH/meta.json" ] || { echo "no shards in $SH" >&2; exit 1; }
set_args=(--set "data.shard_dir=\"$SH\"" "train.steps=$STEPS" "train.eval_every=0" "train.eval_batches=2"
          "train.ckpt_every=0" "train.log_every=5" "train.progress=false")
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
[ "${ngpu:-0}" -ge 2 ] || echo "== only ${ngpu:-0} GPU(s): the 2-GPU runs will fail"
run() {  # mode nproc [extra args]
  local mode=$1 n=$2; shift 2
  local dir=/tmp/scaling/$mode; rm -rf "$dir"; mkdir -p "$OUT/scaling/$mode"
  echo "== $mode ($n GPU) $(date +%T)"
  if [ "$n" -eq 1 ]; then
    CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES%%,*} python3 -m kvshift.cli train "$CONFIG" --out "$dir" "${set_args[@]}" "$@" 2>&1 | tail -n 3
  else
    torchrun --standalone --nproc_per_node="$n" -m kvshift.cli train "$CONFIG" --out "$dir" "${set_args[@]}" "$@" 2>&1 | tail -n 3
  fi
  cp "$dir/summary.json" "$dir/metrics.jsonl" "$OUT/scaling/$mode/" 2>/dev/null
  python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(' tokens/s', round(s['tokens_per_s']), 'mfu', s.get('mfu'), 'world', s.get('world_size'))" "$dir/summary.json" 2>/dev/null
}
run 1gpu 1
run 2gpu-ddp 2
run 2gpu-fsdp2 2 --fsdp
