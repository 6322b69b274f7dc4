"""The benchmark scripts must keep running: CI executes their seconds-long smoke modes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_step_smoke():
    run = subprocess.run([sys.executable, "scripts/bench_step.py", "--smoke", "--no-write"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert ("| optimizer | median ms | IQR ms | min ms | time / AdamW | state MiB | state / AdamW | state / Muon+AdamW |"
            in run.stdout)
    assert "| Muon (torch, + AdamW elsewhere) |" in run.stdout and "| BADM newton_schulz (+ normalized elsewhere) |" in run.stdout


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
    assert "Muon's best final eval loss (target)" in out and "| Muon (torch, + AdamW elsewhere) |" in out


def test_bench_scaling_smoke():
    out = _smoke("bench_scaling.py").stdout
    assert "**per_sub_batch: final eval loss**" in out and "**fused: ms per step**" in out


def test_bench_throughput_smoke():
    out = _smoke("bench_throughput.py").stdout
    assert "| model | optimizer | tokens/s | vs AdamW |" in out and "BADM fused" in out


def test_bench_sft_smoke():
    out = _smoke("bench_sft.py").stdout
    assert "| optimizer | best lr | held-out loss, mean over seeds | exact match, mean (per seed) |" in out


def test_stdlib_docs_corpus_is_real_prose_and_deterministic(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_common as bc

    paras = bc.stdlib_docs_paragraphs()
    assert len(paras) > 2000 and sum(map(len, paras)) > 300_000
    assert len(set(paras)) == len(paras) and all("\n" not in p and len(p.split()) >= 8 for p in paras)
    assert not any(p.startswith(">>>") for p in paras)
    spec = bc.corpus("stdlib_docs", tmp_path)
    train, test = ((Path(spec) / f).read_text().splitlines() for f in ("train.txt", "test.txt"))
    assert len(test) == -(-len(paras) // 20) and len(train) + len(test) == len(paras) and not set(train) & set(test)
    assert bc.corpus_name(spec) == "stdlib_docs" and bc.corpus_info(spec)["paragraphs"] == len(paras)
    assert bc.stdlib_docs_paragraphs() == paras
