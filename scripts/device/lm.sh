#!/usr/bin/env bash
# Language-modelling experiments on the GPU machine (device tool), from the repository root:
#   bash scripts/device/lm.sh "lm-main --only 10m" ["lm-seeds" ...]
# run call: carry ["cache/lm-pack.tar.xz"]; the jobs and their estimated times are in the docstring of
# src/kvshift/experiments/lm.py (`python -m kvshift.experiments.lm plan --scale gpu`).
# Each job is `NAME [--only ..] [--arms ..] [--seeds ..] [--steps N]` (gpu scale implied). With several
# GPUs, job i runs on GPU i mod n_gpus (each GPU's jobs in order). A job starts only with more than
# 60 s left of LM_BUDGET (default 540 s) and is sent SIGTERM at the deadline (the trainer checkpoints
# and stops; the finished runs are kept). results/lm-*-gpu/ go to $OUT/results.tgz after every job:
# here, `tar xzf <files_at>/results.tgz` merges them into results/ (then `python -m
# kvshift.experiments.lm summarize NAME... --scale gpu` and `kvshift report`). Logs: $OUT/lm-gpuN.log.
set -u
[ $# -ge 1 ] || { echo "usage: bash scripts/device/lm.sh \"NAME [options]\" ..." >&2; exit 2; }
start=$(date +%s)
deadline=$(( start + ${LM_BUDGET:-540} ))
OUT=${OUT:-/tmp/lm-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 KVSHIFT_RESULTS=$PWD/results
export KVSHIFT_RUNS=${KVSHIFT_RUNS:-$PWD/runs} KVSHIFT_SHARDS=${KVSHIFT_SHARDS:-$PWD/cache/lm-shards}
PY=${PYTHON:-python3}
PACK=${LM_PACK:-cache/lm-pack.tar.xz}

if [ ! -f "$KVSHIFT_SHARDS/meta.json" ]; then
  [ -f "$PACK" ] || { echo "no $PACK: carry it (run tool: carry [\"cache/lm-pack.tar.xz\"])" >&2; exit 1; }
  t0=$(date +%s)
  "$PY" -m kvshift.data.cli data unpack "$PACK" --out "$KVSHIFT_SHARDS" || exit 1
  echo "== unpacked in $(( $(date +%s) - t0 ))s"
fi

# the GPUs: CUDA_VISIBLE_DEVICES when set (scripts/device/batch.sh gives each job its own), else all
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"
else
  n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  gpus=($(seq 0 $(( ${n:-1} > 0 ? ${n:-1} - 1 : 0 ))))
fi
ngpu=${#gpus[@]}
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader 2>/dev/null

pack_results() {  # atomic: a job finishing meanwhile never leaves a torn archive
  local tmp="$OUT/.results.$1.tgz"
  (cd "$PWD" && tar czf "$tmp" --exclude='*.tmp' $(ls -d results/lm-*-gpu results/shift-coefficients-gpu 2>/dev/null)) \
    && mv -f "$tmp" "$OUT/results.tgz"
}

queue() {  # queue GPU JOB...
  local g=$1; shift
  for job in "$@"; do
    local left=$(( deadline - $(date +%s) ))
    if [ "$left" -le 60 ]; then echo "== [gpu$g] skip '$job': ${left}s left"; continue; fi
    echo "== [gpu$g] $(date +%T) $job (${left}s left)"
    LM_COMMAND="bash scripts/device/lm.sh \"$job\"" CUDA_VISIBLE_DEVICES=${gpus[$g]} \
      timeout -s TERM -k 30 "$left" "$PY" -m kvshift.experiments.lm $job --scale gpu 2>&1 \
      | tr '\r' '\n' | grep -v '^\s*$' >> "$OUT/lm-gpu$g.log"
    echo "== [gpu$g] $(date +%T) done '$job' (exit ${PIPESTATUS[0]}):"
    grep -E '^\[lm\]|^lm-|^shift-|Error|error' "$OUT/lm-gpu$g.log" | tail -n 12
    pack_results "$g"
  done
}

jobs_all=("$@")
for (( g = 0; g < ngpu; g++ )); do
  mine=()
  for (( i = g; i < ${#jobs_all[@]}; i += ngpu )); do mine+=("${jobs_all[$i]}"); done
  [ ${#mine[@]} -gt 0 ] && queue "$g" "${mine[@]}" &
done
wait

# rebuild every touched summary from all runs present (parallel jobs may have summarised early)
names=$(for j in "${jobs_all[@]}"; do echo "${j%% *}"; done | sort -u)  # shift-coefficients sorts after lm-*
[ -n "$names" ] && "$PY" -m kvshift.experiments.lm summarize $names --scale gpu 2>&1 | tail -n 20
pack_results final
echo "== total $(( $(date +%s) - start ))s; results in \$OUT/results.tgz"
