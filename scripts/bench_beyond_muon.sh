#!/usr/bin/env bash
# Issue 20's search on real corpora (docs/benchmarks.md, "Real corpora"); runs are cached by key in
# docs/results/real-corpora/, so a rerun fills only what is missing. 2 CPU cores: about 5.5 hours.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
py="${PYTHON:-.venv/bin/python}"
corpora=(--corpus stdlib_docs --corpus debian_changelogs --corpus licenses)
# BADM nsisa and normuon with normalized on the other tensors (the first pass's variants), BPE, both sizes.
"$py" scripts/bench_convergence.py "${corpora[@]}" --sizes tiny small --optimizers badm_nsisa,badm_normuon \
  --grid badm_normuon=0.03 --fixed badm_normuon --elementwise-lr 0.1 --extend 1 --seeds 2 \
  --out-dir outputs/bench-realcorpora --results docs/results/real-corpora --no-write --no-figures
# The staged search: full at BPE tiny; --lean elsewhere (the compute of 2 cores).
"$py" scripts/bench_beyond_muon.py "${corpora[@]}" --sizes tiny
"$py" scripts/bench_beyond_muon.py "${corpora[@]}" --sizes small --lean --stages peers,badm,seeds
"$py" scripts/bench_beyond_muon.py "${corpora[@]}" --sizes tiny small --char --lean --stages peers,badm,seeds
"$py" scripts/bench_beyond_muon.py "${corpora[@]}" --sizes tiny --stages badm,search,seeds
# What the stages above left to one place or fixed, at every place: the normalized solve's own lr and rho/sigma (with
# its QHAdam peer), Muon + QHAdam's lrs, and newton_schulz's directions crossed with normalized elsewhere.
"$py" scripts/bench_beyond_muon.py "${corpora[@]}" --sizes tiny small --lean --stages cross,seeds
"$py" scripts/bench_beyond_muon.py "${corpora[@]}" --sizes tiny small --char --lean --stages cross,seeds
# Fused projections (hf_badm.roles): split into parts / whole / per head, and Muon with the same split; BPE, both sizes.
"$py" scripts/bench_beyond_muon.py "${corpora[@]}" --sizes tiny small --stages split
"$py" scripts/bench_beyond_muon.py "${corpora[@]}" --report --note docs/results/real-corpora/reading.md
