#!/usr/bin/env bash
# The language-model experiments' device command (recorded in their results): the same as experiment.sh.
#   bash scripts/device/lm.sh "lm-main --only 10m" ["lm-seeds" ...]     (carry cache/lm-pack.tar.xz)
exec bash "$(dirname "$0")/experiment.sh" "$@"
