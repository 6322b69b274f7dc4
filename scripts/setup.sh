#!/usr/bin/env bash
# Set up hf_badm in ./.venv (or the active virtual environment) with everything the tests and CLI need.
# torch comes first: TORCH_SPEC (default torch==2.13.0, the CPU wheel) is installed only when no torch
# is importable yet, so a GPU user who installed their own CUDA build keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
else
  PY="$VIRTUAL_ENV/bin/python"
fi
"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install -q -e ".[dev]"
echo "hf_badm set up in $(dirname "$(dirname "$PY")")"
