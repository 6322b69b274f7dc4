"""The learning rates ``hf-badm compare`` and ``hf-badm demo`` give each optimizer, and the rule that picks one.

Each number is that optimizer's best on the small GPT-2 sweep (``scripts/bench_convergence.py``, tiny GPT-2 2x64 and
small GPT-2 4x128 on the built-in corpus; every sweep point in docs/results/convergence/, the tables in
docs/benchmarks.md and docs/preconditioners.md). On real text (docs/benchmarks.md, "Real corpora: BADM beyond Muon")
the geometric mean over the 12 places chose the same rates for Muon (0.03, AdamW 0.1 elsewhere) and newton_schulz
(0.03, normalized 0.1 elsewhere). Change a number here only with a new measurement recorded there. These are the
application's tables: the optimizer's own defaults (rho/sigma, the elementwise sigma) belong to each local solve.
"""

from __future__ import annotations

__all__ = ["COMPARE_LEARNING_RATES", "DEMO_LEARNING_RATES"]

# ``badm`` is the paper's BADM (plain BADM's best: 3, both sizes); ``badm-<preconditioner>`` that variant's own scale.
COMPARE_LEARNING_RATES: dict[str, float] = {
    "badm": 3.0, "adamw_torch": 3e-3, "adamw_torch_fused": 3e-3, "sgd": 0.3, "adafactor": 1e-3, "lion_32bit": 1e-4,
    "schedule_free_adamw": 3e-3, "badm-newton_schulz": 0.03, "badm-normalized": 3e-3, "badm-second_moment": 10.0,
    "muon": 0.03, "normuon": 0.03, "badm-normuon": 0.03, "badm-nsisa": 0.03, "muon_qhadam": 0.03,
}
# The demo trains the tiny GPT-2, where AdamW's optimum was 1e-2: the demo compares tuned against tuned.
DEMO_LEARNING_RATES: dict[str, float] = {"adamw_torch": 1e-2}
