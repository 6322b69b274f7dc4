#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py): CUDA correctness, optimizer step time at 124M parameters,
# Newton-Schulz in bfloat16 vs float32 and a short convergence sweep, in under 8 minutes on one GPU.
#
#   bash scripts/gpu_check.sh              # on a CUDA machine; output under $OUT if set, else docs/results
#   bash scripts/gpu_check.sh --dry-run    # tiny sizes on the CPU (seconds to a minute)
#   bash scripts/gpu_check.sh --collect DIR   # copy a GPU run's output (DIR = its $OUT) into docs/
#
# Needs a Python with torch (a CUDA build), transformers, accelerate, datasets and tokenizers (matplotlib
# for the plots, optional); hf_badm itself is used from this working tree (no install, no internet).
# PYTHON=/path/to/python picks the interpreter (default: python, else python3, else ./.venv/bin/python).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python python3 .venv/bin/python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
      PYTHON=$candidate; break
    fi
  done
  PYTHON=${PYTHON:-python}
fi
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "gpu_check: no Python interpreter '$PYTHON'; set PYTHON=/path/to/python" >&2
  exit 3
fi
"$PYTHON" - <<'PY' || exit 3
import importlib.util, platform, sys
need = ["torch", "transformers", "accelerate", "datasets", "tokenizers"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
optional = [m for m in ("matplotlib",) if importlib.util.find_spec(m) is None]
print(f"gpu_check: Python {platform.python_version()} at {sys.executable}")
if missing:
    print(f"gpu_check: this Python lacks {', '.join(missing)} (needed: {', '.join(need)}). Install them "
          "(e.g. pip install -e '.[dev]' where a package index is reachable) or set PYTHON to an interpreter "
          "that has them.", file=sys.stderr)
    sys.exit(3)
import torch, transformers
cuda = torch.cuda.is_available()
print(f"gpu_check: torch {torch.__version__} (CUDA build {torch.version.cuda}), transformers {transformers.__version__}, "
      f"CUDA device: {torch.cuda.get_device_name(0) if cuda else 'none'}"
      + (f"; without {', '.join(optional)} the plots are skipped" if optional else ""))
PY
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" scripts/gpu_check.py "$@"
