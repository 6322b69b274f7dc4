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
    # the optimizers the report's rows and references need (each other optimizer is a recipe the CLI tests run)
    out = _smoke("bench_convergence.py", "--optimizers", "badm,badm_s4,adamw_torch,sgd,badm_norm,badm_ns_norm,muon").stdout
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
    assert ("| optimizer | best lr | held-out loss, mean over seeds | exact match, mean (per seed) | steps to AdamW's "
            "final held-out loss |") in out
    assert all(f"| {name} |" in out for name in ("AdamW", "Muon (+ AdamW elsewhere)", "BADM fused", "BADM normalized",
                                                  "BADM newton_schulz"))


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


def test_gpu_check_dry_run(tmp_path):
    """The prepared GPU check runs end to end on the CPU (tiny sizes) and records every part."""
    import json
    import os

    run = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert {k: v["status"] for k, v in result["parts"].items()} == {
        "correctness": "ok", "step_time": "ok", "ns_dtype": "ok", "convergence": "ok"}
    kernels = result["parts"]["correctness"]["kernels"]
    assert {(r["preconditioner"], r["mode"]) for r in kernels} == {
        (p, m) for p in ("none", "second_moment", "normalized", "newton_schulz") for m in ("fused", "per_sub_batch")}
    assert {r["optimizer"] for r in result["parts"]["step_time"]["rows"]} >= {"adamw", "muon", "badm", "badm_norm", "badm_ns"}
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("## GPU check") and "CPU dry run" in md and "Muon's best final eval loss" in md
    assert list((tmp_path / "convergence-gpu").glob("builtin-tiny-*.json"))


def test_gpu_check_names_what_is_missing(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexec " + sys.executable + " -S \"$@\"\n")  # -S: no site-packages, so no torch
    fake.chmod(0o755)
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**__import__("os").environ, "PYTHON": str(fake)})
    assert run.returncode == 3 and "lacks torch" in run.stderr


def test_bench_beyond_muon_report_from_the_recorded_runs(tmp_path):
    """The real-corpus section is rebuilt from docs/results/real-corpora/ alone (no corpus gathered, nothing run)."""
    docs = tmp_path / "benchmarks.md"
    run = subprocess.run([sys.executable, "scripts/bench_beyond_muon.py", "--report", "--docs", str(docs)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    text = docs.read_text()
    assert "## Real corpora: BADM beyond Muon" in text and "### Defaults chosen on real text" in text
    assert "### BPE tokens, GPT-2 tiny (300 steps): best point per corpus" in text and "### Ablation" in text
    assert "| Muon (torch, + AdamW elsewhere) | 3.9" in text
