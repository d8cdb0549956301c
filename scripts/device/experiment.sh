#!/usr/bin/env bash
# Experiments on the GPU machine (device tool), from the repository root:
#   bash scripts/device/experiment.sh "NAME [options]" ["NAME [options]" ...]
# Each job is `kvshift experiment NAME --scale gpu [options]` (e.g. "lm-main --only 10m", "hopk --n-seeds 3",
# "induction-depth --steps 2000"); results go to results/NAME-gpu/ as always. With several GPUs, job i
# runs on GPU i mod n (each GPU's jobs in order; CUDA_VISIBLE_DEVICES, when set, lists the GPUs). A job
# starts only with more than 60 s left of BUDGET (default 540 s) and gets SIGTERM at the deadline (the
# trainer checkpoints and stops; finished runs are kept; rerunning the job does the rest). The touched
# results directories go to $OUT/results.tgz after every job: here, `tar xzf <files_at>/results.tgz`.
# Language-model jobs need the token shards: carry cache/lm-pack.tar.xz (LM_PACK), unpacked once into
# cache/lm-shards. Run directories and checkpoints stay in runs/. Logs: $OUT/gpuN.log.
# Environment (this script's own parameters): OUT, BUDGET, LM_PACK, PYTHON, KVSHIFT_GIT_COMMIT (the
# commit to record: the device gets the tree without .git).
set -u
[ $# -ge 1 ] || { echo "usage: bash scripts/device/experiment.sh \"NAME [options]\" ..." >&2; exit 2; }
start=$(date +%s)
deadline=$(( start + ${BUDGET:-540} ))
OUT=${OUT:-/tmp/experiment-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SHARDS=cache/lm-shards; PACK=${LM_PACK:-cache/lm-pack.tar.xz}

if [ ! -f "$SHARDS/meta.json" ] && [ -f "$PACK" ]; then
  t0=$(date +%s)
  "$PY" -m kvshift.cli data unpack "$PACK" --out "$SHARDS" | tail -n 1 || exit 1
  echo "== unpacked $PACK in $(( $(date +%s) - t0 ))s"
fi

if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"
else
  n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  gpus=($(seq 0 $(( ${n:-1} > 0 ? ${n:-1} - 1 : 0 ))))
fi
ngpu=${#gpus[@]}
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader 2>/dev/null

names=$(for j in "$@"; do echo "${j%% *}"; done | sort -u)
# The device resets results/ to the carried tree at every call, but keeps ignored folders while the machine is
# warm: what earlier calls published is mirrored in runs/published/ and restored here (the tree's own files
# win), so the summaries and the archive of a later call hold every run of the warm machine's calls.
KEEP=runs/published
for n in $names; do
  if [ -d "$KEEP/$n-gpu" ]; then
    mkdir -p "results/$n-gpu" && cp -rn "$KEEP/$n-gpu/." "results/$n-gpu/" && echo "== restored $KEEP/$n-gpu"
  fi
done
pack_results() {  # atomic: a job finishing meanwhile never leaves a torn archive
  local tmp="$OUT/.results.$1.tgz" dirs=()
  for n in $names; do [ -d "results/$n-gpu" ] && dirs+=("results/$n-gpu"); done
  [ ${#dirs[@]} -gt 0 ] && tar czf "$tmp" --exclude='*.tmp' "${dirs[@]}" && mv -f "$tmp" "$OUT/results.tgz"
}

queue() {  # GPU JOB...
  local g=$1; shift
  for job in "$@"; do
    local left=$(( deadline - $(date +%s) ))
    if [ "$left" -le 60 ]; then echo "== [gpu$g] skip '$job': ${left}s left"; continue; fi
    echo "== [gpu$g] $(date +%T) $job (${left}s left)"
    CUDA_VISIBLE_DEVICES=${gpus[$g]} timeout -s TERM -k 30 "$left" \
      "$PY" -m kvshift.cli experiment $job --scale gpu 2>&1 | tr '\r' '\n' | grep -v '^\s*$' >> "$OUT/gpu$g.log"
    echo "== [gpu$g] $(date +%T) done '$job' (exit ${PIPESTATUS[0]}):"
    tail -n 8 "$OUT/gpu$g.log"
    pack_results "$g"
  done
}

for (( g = 0; g < ngpu; g++ )); do
  mine=(); args=("$@")
  for (( i = g; i < ${#args[@]}; i += ngpu )); do mine+=("${args[$i]}"); done
  [ ${#mine[@]} -gt 0 ] && queue "$g" "${mine[@]}" &
done
wait

# rebuild every touched summary built from published runs (language models, iGSM) from all runs present (parallel jobs may have summarised early)
for n in $names; do
  case $n in lm-*|shift-coefficients|upcycle|igsm) "$PY" -m kvshift.cli experiment "$n" --scale gpu --summarize 2>&1 | tail -n 2;; esac
done
for n in $names; do  # mirrored for the next call on this machine (one process here: no job is writing)
  [ -d "results/$n-gpu" ] && mkdir -p "$KEEP/$n-gpu" && cp -r "results/$n-gpu/." "$KEEP/$n-gpu/"
done
pack_results final
echo "== total $(( $(date +%s) - start ))s; results in \$OUT/results.tgz"
