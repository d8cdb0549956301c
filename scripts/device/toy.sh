#!/usr/bin/env bash
# Run on the GPU machine (device tool) from the repository root: the toy experiments at gpu scale.
# Usage: bash scripts/device/toy.sh "induction-width:2000 shift-dynamics:1500 induction-depth:1500"
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20 KVSHIFT_RESULTS=/tmp/results
mkdir -p /tmp/results
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
for item in $1; do
  name=${item%%:*}; steps=${item##*:}
  echo "== $name ($steps steps) $(date +%T)"
  python3 -m kvshift.cli experiment "$name" --scale gpu --steps "$steps" 2>&1 | grep -v '^\s*$' | tail -n 12
done
tar czf "$OUT/results.tgz" -C /tmp results
