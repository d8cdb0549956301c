#!/usr/bin/env bash
# Export finished LM runs (kept with `kvshift experiment ... --keep-checkpoints`) on the GPU machine:
#   bash scripts/device/export.sh NAME=RUN_DIR[:return] ...
# For each: `kvshift export --dtype bfloat16` (tokenizer $TOKENIZER, default cache/tokenizer-16k.json,
# carried) into /tmp/export/NAME, `kvshift analyze` into $ANALYSIS/NAME/ (default
# results/lm-downstream-gpu/analysis: where the lm-downstream experiment reads a pair's head analyses), and
# with ":return" the weights come back through $RETURN_DIR as NAME.safetensors.partNN (15 MiB pieces; 8 files per call at most)
# with the rest of the export in $OUT/NAME.tgz. Here: `cat NAME.safetensors.part* > DIR/model.safetensors`
# after `tar xzf NAME.tgz -C DIR`.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; RET=${RETURN_DIR:-$OUT}; TOK=${TOKENIZER:-cache/tokenizer-16k.json}
ANALYSIS=${ANALYSIS:-results/lm-downstream-gpu/analysis}
mkdir -p "$OUT" "$RET"
rc=0
for item in "$@"; do
  name=${item%%=*}; rest=${item#*=}; run=${rest%:return}
  [ -d "$run" ] || { echo "== $name: no run directory $run" >&2; rc=1; continue; }
  grep -q '"status": "finished"' "$run/summary.json" 2>/dev/null \
    || { echo "== $name: $run did not finish (summary.json), not exported" >&2; rc=1; continue; }
  dst=/tmp/export/$name; rm -rf "$dst"
  echo "== $name <- $run $(date +%T)"
  python3 -m kvshift.cli export "$run" "$dst" --dtype bfloat16 --tokenizer "$TOK" 2>&1 | tail -n 2 || { rc=1; continue; }
  python3 -m kvshift.cli analyze "$dst" --out "$ANALYSIS/$name" 2>&1 | tail -n 4
  if [ "$rest" != "$run" ]; then
    split -b 15M -d "$dst/model.safetensors" "$RET/$name.safetensors.part"
    tar czf "$OUT/$name.tgz" -C "$dst" --exclude model.safetensors .
    ls -l "$RET/$name".safetensors.part*
  fi
done
exit $rc
