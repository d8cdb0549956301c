#!/usr/bin/env bash
# Run on the GPU machine (device tool) from the repository root: experiments at gpu scale, one after
# another within a time budget; results are packed into $OUT/results.tgz after each one.
# Usage: bash scripts/device/toy.sh BUDGET_SECONDS "induction-width:2000 shift-dynamics:1500 hopk: ..."
# (NAME: with no steps = the experiment's own gpu steps; results in $KVSHIFT_RESULTS, default /tmp/results)
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30 KVSHIFT_RESULTS=${KVSHIFT_RESULTS:-/tmp/results}
OUT=${OUT:-/tmp/out}; mkdir -p "$KVSHIFT_RESULTS" "$OUT"
deadline=$(( $(date +%s) + $1 ))
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
for item in $2; do
  name=${item%%:*}; steps=${item#"$name"}; steps=${steps#:}
  left=$(( deadline - $(date +%s) - 10 ))
  [ "$left" -gt 30 ] || { echo "== skip $name: no time left"; continue; }
  echo "== $name ($steps steps, ${left}s left) $(date +%T)"
  timeout "$left" python3 -m kvshift.cli experiment "$name" --scale gpu ${steps:+--steps "$steps"} 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -n 8
  tar czf "$OUT/results.tgz" -C "$(dirname "$KVSHIFT_RESULTS")" "$(basename "$KVSHIFT_RESULTS")"
done
