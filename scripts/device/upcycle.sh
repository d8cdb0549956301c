#!/usr/bin/env bash
# The upcycle experiment (continued pretraining of SmolLM2-135M from the identity shift: vanilla, KV shift and
# KV shift at a 10x higher coefficient rate; K shift on request) on the GPU machine (device tool), from the repository root. The GGUF (98 MB) is larger than
# one call carries (64 MiB), so it travels as `kvshift data split` parts in successive calls (the machine
# keeps ignored files while it stays warm, 30 s after a call) and is reassembled here, checked by sha256:
#   call 1  carry G.part0, G.parts.json, cache/upcycle/site     bash scripts/device/upcycle.sh stage
#   call 2  carry G.part1                                       bash scripts/device/upcycle.sh stage
#   call 3  carry cache/upcycle/shards.tar.xz                   bash scripts/device/upcycle.sh run
#   (more)  nothing new to carry                                ARMS=... SEEDS=... bash scripts/device/upcycle.sh run
# with G = cache/upcycle/gguf/SmolLM2-135M-Instruct.Q4_1.gguf; docs/gpu.md says how to make them here.
# `stage` only reports what has arrived. `run` joins the GGUF (refusing a missing or different part),
# converts it once (`kvshift convert-llama`, identity shift; cache/upcycle/smollm2-kvshift), unpacks the
# SmolLM2-tokenized shards once (cache/upcycle-shards), then runs one job per arm and seed through
# scripts/device/experiment.sh (job i on GPU i mod n, within BUDGET): seed by seed vanilla and kvshift
# first (what the verdict needs), then the other arms. Runs resume in runs/upcycle/ while the machine stays warm.
# cache/upcycle/site holds the pure-Python `gguf` package (not in the device image; transformers needs it
# to read a GGUF): copied from the local environment with its dist-info.
# Environment: OUT, BUDGET (s, default 540), ARMS (default "vanilla kvshift kvshift-fast"), SEEDS (default "0 1"),
# STEPS (optional: fewer steps), PYTHON, KVSHIFT_GIT_COMMIT, and SCORE: a requests file (`kvshift eval
# --record` here, carried with the shards) to score on the device after training, since the trained models
# (1.6 GB checkpoints) never come back: the source model and every finished run's final checkpoint
# (`kvshift eval-score`, bf16) -> scores-source.npz, scores-ARM-sSEED.npz in $OUT/scores.tgz, for this call's
# ARMS x SEEDS only (SCORE_SOURCE=0 skips the source model, scored once already); the training jobs then
# stop SCORE_RESERVE seconds (default 150) before BUDGET. Here: `kvshift eval --scores` replays them through
# lm-eval, then `kvshift experiment upcycle-benchmarks --scale gpu --input source=... vanilla=... kvshift=...`.
set -u
MODE=${1:-run}
G=SmolLM2-135M-Instruct.Q4_1.gguf
DIR=cache/upcycle; MODEL=$DIR/smollm2-kvshift; SHARDS=cache/upcycle-shards; PACK=$DIR/shards.tar.xz
OUT=${OUT:-/tmp/upcycle-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/$DIR/site PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
start=$(date +%s)

echo "== carried so far:"; ls -l "$DIR" "$DIR/gguf" 2>/dev/null | grep -v '^total'
if [ "$MODE" = stage ]; then exit 0; fi
[ "$MODE" = run ] || { echo "usage: bash scripts/device/upcycle.sh stage|run" >&2; exit 2; }

if [ ! -f "$MODEL/config.json" ]; then
  "$PY" -m kvshift.cli data join "$DIR/gguf/$G.parts.json" --out "$DIR/$G" || {
    echo "== the GGUF is incomplete: carry its parts (calls 1 and 2) again; a fresh machine needs all three calls" >&2; exit 1; }
  t0=$(date +%s)
  "$PY" -m kvshift.cli convert-llama "$DIR/$G" "$MODEL" || exit 1
  echo "== converted in $(( $(date +%s) - t0 ))s"
fi
if [ ! -f "$SHARDS/meta.json" ]; then
  [ -f "$PACK" ] || { echo "no $PACK: carry it (call 3)" >&2; exit 1; }
  "$PY" -m kvshift.cli data unpack "$PACK" --out "$SHARDS" | tail -n 1 || exit 1
fi

jobs=()
common="--input model=$MODEL --shards $SHARDS${STEPS:+ --steps $STEPS}"
reserve=0
if [ -n "${SCORE:-}" ]; then
  [ -f "$SCORE" ] || { echo "SCORE=$SCORE: no such requests file (carry it)" >&2; exit 1; }
  common="$common --keep-checkpoints"; reserve=${SCORE_RESERVE:-150}
fi
ARMS=${ARMS:-vanilla kvshift kvshift-fast}
first() { [ "$1" = vanilla ] || [ "$1" = kvshift ]; }  # what the verdict needs, seed by seed, before other arms
for s in ${SEEDS:-0 1}; do
  for a in $ARMS; do first "$a" && jobs+=("upcycle --arms $a --seeds $s $common"); done
done
for s in ${SEEDS:-0 1}; do
  for a in $ARMS; do first "$a" || jobs+=("upcycle --arms $a --seeds $s $common"); done
done
left=$(( ${BUDGET:-540} - reserve - ($(date +%s) - start) ))
BUDGET=$left bash scripts/device/experiment.sh "${jobs[@]}"
echo "== upcycle training done at $(( $(date +%s) - start ))s"

if [ -n "${SCORE:-}" ]; then  # one scoring queue per GPU, in parallel; each model once
  n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); [ "${n:-0}" -ge 1 ] || n=1
  models=()
  [ "${SCORE_SOURCE:-1}" = 0 ] || models+=("source=$MODEL")  # the source scores once; later calls: SCORE_SOURCE=0
  mine_only=" "; for s in ${SEEDS:-0 1}; do for a in $ARMS; do mine_only+="$a-s$s "; done; done
  # exactly the runs the summary reports: each published run (results/upcycle-gpu/runs/ARM-sSEED) names its
  # scratch directory by the hash of its key; a run of other settings left in runs/ by an earlier call is not one
  while IFS='=' read -r name rd; do
    # only this call's ARMS x SEEDS: a run of an earlier call on this warm machine has its scores already
    [ -d "$rd/checkpoints" ] && [[ "$mine_only" == *" $name "* ]] && models+=("$name=$rd")
  done < <("$PY" -c 'from kvshift.experiments.upcycle import published_runs as p
for k, v in p("results/upcycle-gpu", "runs").items(): print(f"{k}={v}")')
  score_queue() {  # GPU MODEL...
    local g=$1; shift
    for m in "$@"; do
      local name=${m%%=*} path=${m#*=}
      [ -f "$OUT/scores-$name.npz" ] && continue
      t0=$(date +%s)
      CUDA_VISIBLE_DEVICES=$g "$PY" -m kvshift.cli eval-score "$path" "$SCORE" --out "$OUT/scores-$name.npz" \
        --device cuda --dtype bfloat16 > "$OUT/score-$name.log" 2>&1 \
        && echo "== scored $name in $(( $(date +%s) - t0 ))s" || { echo "== scoring $name failed:"; tail -n 5 "$OUT/score-$name.log"; }
    done
  }
  for (( g = 0; g < n; g++ )); do
    mine=(); for (( i = g; i < ${#models[@]}; i += n )); do mine+=("${models[$i]}"); done
    score_queue "$g" "${mine[@]}" &
  done
  wait
  # one archive: a call returns at most 8 files (five score files, their logs and results.tgz would not fit)
  (cd "$OUT" && tar czf scores.tgz scores-*.npz score-*.log 2>/dev/null && rm -f scores-*.npz score-*.log)
  ls -l "$OUT"
fi
echo "== upcycle total $(( $(date +%s) - start ))s"
