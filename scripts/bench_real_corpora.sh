#!/usr/bin/env bash
# Real corpora, first pass (docs/benchmarks.md, "Real corpora (first pass)"): three corpora gathered at run time, the
# peers (AdamW, Muon, NorMuon) and the BADM family's Muon-like settings, 2 seeds. Usage: bench_real_corpora.sh SIZE
# [extra bench_convergence.py options]; then the same with --report-only to write the section.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-tiny}; shift || true
export OMP_NUM_THREADS=1
exec "${PYTHON:-.venv/bin/python}" scripts/bench_convergence.py --corpus stdlib_docs --corpus debian_changelogs \
  --corpus licenses --sizes "$size" --optimizers adamw_torch,muon,normuon,badm_ns_norm,badm_nsisa,badm_normuon \
  --grid adamw_torch=0.01 --grid badm_ns_norm=0.03 --fixed adamw_torch,badm_ns_norm,badm_normuon --elementwise-lr 0.1 \
  --extend 1 --seeds 2 --threads 1 --out-dir outputs/bench-realcorpora --results docs/results/real-corpora \
  --section "## Real corpora (first pass)" --cross-corpus --no-figures "$@"
