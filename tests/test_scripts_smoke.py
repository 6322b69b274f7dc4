"""The benchmark script must keep running: CI executes its seconds-long smoke mode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_step_smoke():
    run = subprocess.run([sys.executable, "scripts/bench_step.py", "--smoke", "--no-write"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "| optimizer | median ms | IQR ms | min ms | time / AdamW | state MiB | state / AdamW |" in run.stdout


def _smoke(script: str, *extra: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, f"scripts/{script}", "--smoke", *extra], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_bench_convergence_smoke():
    out = _smoke("bench_convergence.py").stdout
    assert "| optimizer | best lr | rho/sigma |" in out and "AdamW's best final eval loss (target)" in out
    assert "BADM fused" in out and "BADM per-sub-batch (S=4)" in out and "SGD+momentum" in out
    assert "BADM normalized" in out and "BADM newton_schulz (elementwise normalized)" in out


def test_bench_scaling_smoke():
    out = _smoke("bench_scaling.py").stdout
    assert "**per_sub_batch: final eval loss**" in out and "**fused: ms per step**" in out


def test_bench_throughput_smoke():
    out = _smoke("bench_throughput.py").stdout
    assert "| model | optimizer | tokens/s | vs AdamW |" in out and "BADM fused" in out


def test_bench_sft_smoke():
    out = _smoke("bench_sft.py").stdout
    assert "| optimizer | best lr | held-out loss, mean over seeds | exact match, mean (per seed) |" in out


def test_probe_second_moment_target_smoke(tmp_path):
    out = _smoke("probe_second_moment_target.py", "--out-dir", str(tmp_path)).stdout
    assert "== v tracks g:" in out and "== v tracks g + pi:" in out
