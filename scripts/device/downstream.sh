#!/usr/bin/env bash
# Downstream benchmarks of an lm-main pair on the GPU machine (device tool), from the repository root:
#   bash scripts/device/downstream.sh SIZE REQUESTS        e.g. bash scripts/device/downstream.sh 50m cache/offload/requests-16k.npz
# carry: the LM pack (LM_PACK, default cache/lm-pack.tar.xz; a smaller-validation pack from
# `kvshift data pack --max-val-tokens` leaves room in the 64 MiB tree) and REQUESTS (`kvshift eval --record`
# here). The device has neither lm-eval nor the benchmark data, and the trained models are too large to
# copy back, so: both arms of `lm-main --only SIZE` train again (same config, seed and training tokens as
# the committed run; one GPU each when there are two), their checkpoints are kept, each is scored on the
# recorded requests (`kvshift eval-score`, bf16 as `kvshift export --dtype bfloat16` saves it) and
# analysed (`kvshift analyze`). $OUT gets scores-SIZE-ARM.npz and downstream.tgz (the re-run's summaries
# under rerun/, the analyses under $ANALYSIS/SIZE-ARM/ (default results/lm-downstream-SIZE-gpu/analysis), logs).
# The committed lm-main results are not touched. Here: `tar xzf downstream.tgz`, then `kvshift eval SHELL
# --scores ... --requests ...` and `kvshift experiment lm-downstream --scale gpu --input ARM=EVAL.json ...`
# (see results/lm-downstream-*/README.md).
set -u
[ $# -eq 2 ] || { echo "usage: bash scripts/device/downstream.sh SIZE REQUESTS" >&2; exit 2; }
SIZE=$1; REQ=$2; start=$(date +%s)
[ -f "$REQ" ] || { echo "no requests file $REQ: carry it" >&2; exit 1; }
OUT=${OUT:-/tmp/downstream-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
SHARDS=$PWD/cache/lm-shards; ANALYSIS=${ANALYSIS:-results/lm-downstream-$SIZE-gpu/analysis}
PY=${PYTHON:-python3}; PACK=${LM_PACK:-cache/lm-pack.tar.xz}
if [ ! -f "$SHARDS/meta.json" ]; then
  [ -f "$PACK" ] || { echo "no $PACK: carry it" >&2; exit 1; }
  "$PY" -m kvshift.cli data unpack "$PACK" --out "$SHARDS" | tail -n 1 || exit 1
  echo "== unpacked in $(( $(date +%s) - start ))s"
fi
n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); [ "${n:-0}" -ge 1 ] || n=1
mkdir -p rerun

arm_job() {  # ARM GPU: train, then score and analyse the final checkpoint
  local arm=$1 gpu=$2 log=rerun/$1.log
  echo "== [$arm gpu$gpu] $(date +%T) training" >> "$log"
  CUDA_VISIBLE_DEVICES=$gpu "$PY" -m kvshift.cli experiment lm-main --only "$SIZE" --arms "$arm" --scale gpu \
    --shards "$SHARDS" --out rerun/results/lm-main-gpu --runs "rerun/runs-$arm" --keep-checkpoints \
    2>&1 | tr '\r' '\n' | grep -v '^\s*$' >> "$log"
  local run; run=$(ls -d rerun/runs-"$arm"/lm/*/ | head -n 1)
  grep -q '"status": "finished"' "$run/summary.json" 2>/dev/null || { echo "== [$arm] did not finish" >> "$log"; return 1; }
  echo "== [$arm gpu$gpu] $(date +%T) scoring" >> "$log"
  CUDA_VISIBLE_DEVICES=$gpu "$PY" -m kvshift.cli eval-score "$run" "$REQ" --out "$OUT/scores-$SIZE-$arm.npz" \
    --device cuda --dtype bfloat16 >> "$log" 2>&1
  CUDA_VISIBLE_DEVICES=$gpu "$PY" -m kvshift.cli analyze "$run" --out "$ANALYSIS/$SIZE-$arm" >> "$log" 2>&1
  echo "== [$arm gpu$gpu] $(date +%T) done" >> "$log"
}

if [ "$n" -ge 2 ]; then
  arm_job vanilla 0 & arm_job kvshift 1 & wait
else
  arm_job vanilla 0; arm_job kvshift 0
fi
tail -n 6 rerun/*.log
tar czf "$OUT/downstream.tgz" --exclude='checkpoints' --exclude='*.safetensors' rerun/results rerun/*.log \
  "$ANALYSIS/$SIZE-vanilla" "$ANALYSIS/$SIZE-kvshift" 2>/dev/null
ls -l "$OUT"; echo "== total $(( $(date +%s) - start ))s"
