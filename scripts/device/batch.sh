#!/usr/bin/env bash
# Several device jobs at once on a machine of several GPUs (device tool), from the repository root:
#   bash scripts/device/batch.sh BUDGET_S "GPUS|COMMAND" ["GPUS|COMMAND" ...]
# e.g. bash scripts/device/batch.sh 560 "0|bash scripts/device/bench.sh" "1|bash scripts/device/experiment.sh 'lm-main --only 10m'"
# Each COMMAND runs under bash with CUDA_VISIBLE_DEVICES=GPUS, its own OUT (/tmp/batch/jobN),
# BENCH_TIMEOUT and BUDGET (BATCH_TAIL=40 s before the deadline), and is killed at the deadline. The LM
# pack ($LM_PACK, default cache/lm-pack.tar.xz, when carried) is unpacked once, before any job, into
# cache/lm-shards.
# Every 60 s and at the end, $OUT/batch.tgz gets every file under results/ written since the start plus the
# jobs' logs and outputs (not their results.tgz); files a job puts in $RETURN_DIR (= $OUT) come back
# as they are (at most 8 files in all, 16 MiB each). Here: `tar xzf <files_at>/batch.tgz` in the repo root
# (results/ merge in place; logs land in batch/, which git ignores).
set -u
[ $# -ge 2 ] || { echo "usage: bash scripts/device/batch.sh BUDGET_S \"GPUS|COMMAND\" ..." >&2; exit 2; }
start=$(date +%s); deadline=$(( start + $1 )); shift; ROOT=$PWD
OUT=${OUT:-/tmp/batch-out}; J=/tmp/batch; rm -rf "$J"; mkdir -p "$J" "$OUT"
stamp=$J/.start; touch -d "@$start" "$stamp"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 RETURN_DIR=$OUT
SHARDS=cache/lm-shards
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader 2>/dev/null
PACK=${LM_PACK:-cache/lm-pack.tar.xz}
if [ ! -f "$SHARDS/meta.json" ] && [ -f "$PACK" ]; then
  t0=$(date +%s); "${PYTHON:-python3}" -m kvshift.cli data unpack "$PACK" --out "$SHARDS" | tail -n 2
  echo "== unpacked the LM pack in $(( $(date +%s) - t0 ))s"
fi

pack() {  # atomic, so a cut call still returns the last complete archive
  (cd "$ROOT" && find results -type f -newer "$stamp" ! -name '*.tmp' ! -path '*/models/*' 2>/dev/null) > "$J/.l1"
  (cd /tmp && find batch -type f ! -name results.tgz ! -name '.*' 2>/dev/null) > "$J/.l2"
  tar czf "$OUT/.batch.tgz" -C "$ROOT" -T "$J/.l1" -C /tmp -T "$J/.l2" && mv -f "$OUT/.batch.tgz" "$OUT/batch.tgz"
  local size; size=$(stat -c %s "$OUT/batch.tgz" 2>/dev/null || echo 0)
  if [ "$size" -gt $(( 16 * 1024 * 1024 )) ]; then  # it would not come back: say what made it big
    echo "== WARNING: batch.tgz is $(( size >> 20 )) MiB, over the 16 MiB return limit; largest files:"
    (cd "$ROOT" && xargs -a "$J/.l1" -d '\n' ls -S -l 2>/dev/null | head -n 5)
  fi
}

i=0; pids=()
for spec in "$@"; do
  gpus=${spec%%|*}; cmd=${spec#*|}; d=$J/job$i; mkdir -p "$d"
  left=$(( deadline - $(date +%s) ))
  echo "== job$i [gpu $gpus] $(date +%T): $cmd"
  echo "$cmd" > "$d/command"
  ( export CUDA_VISIBLE_DEVICES=$gpus OUT=$d BENCH_TIMEOUT=$(( left - 15 )) BUDGET=$(( left - ${BATCH_TAIL:-40} ))
    timeout -k 15 "$left" bash -c "$cmd" > "$d/log" 2>&1; echo "== exit $?" >> "$d/log" ) &
  pids+=($!); i=$(( i + 1 ))
done
( while sleep 60; do pack; done ) & packer=$!
wait "${pids[@]}"
kill "$packer" 2>/dev/null
for (( k = 0; k < i; k++ )); do echo "== job$k: $(cat "$J/job$k/command")"; tail -n 6 "$J/job$k/log"; done
pack
echo "== batch done in $(( $(date +%s) - start ))s"; ls -l "$OUT"
