#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py), under 8 minutes on one GPU; hf_badm from this working tree.
#   bash scripts/gpu_check.sh [--dry-run (tiny, on the CPU) | --collect DIR (a run's $OUT into docs/)]
# PYTHON=/path/to/python picks the interpreter (default: python, else python3, else ./.venv/bin/python, with torch).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  for PYTHON in python python3 .venv/bin/python; do "$PYTHON" -c "import torch" >/dev/null 2>&1 && break; done
fi
command -v "$PYTHON" >/dev/null 2>&1 || { echo "gpu_check: no Python '$PYTHON'; set PYTHON=/path/to/python" >&2; exit 3; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" scripts/gpu_check.py "$@"
