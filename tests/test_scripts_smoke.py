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
