"""Tuned defaults beyond the local solves' own (each solve's file holds its rho/sigma and learning-rate scale).

Each number was measured by ``scripts/bench_convergence.py`` (tiny GPT-2 2x64, 300 steps, and small
GPT-2 4x128, 150 steps, on the built-in corpus; every sweep point in docs/results/convergence/,
the tables in docs/benchmarks.md and docs/preconditioners.md). On real text (three corpora gathered at run time, BPE
and byte-level tokens, both sizes: docs/benchmarks.md, "Real corpora: BADM beyond Muon") the geometric mean over the 12
places chose the same learning rates for Muon (0.03, AdamW 0.1 elsewhere) and newton_schulz (0.03, normalized 0.1
elsewhere). Change a number here only with a new measurement recorded there.
"""

from __future__ import annotations

from hf_badm.optim import solves  # noqa: F401  (registers the built-in local solves)
from hf_badm.optim.local_solve import LOCAL_SOLVES

__all__ = ["RHO_OVER_SIGMA", "ELEMENTWISE_SIGMA", "COMPARE_LEARNING_RATES", "DEMO_LEARNING_RATES", "default_rho"]

# Each local solve keeps its own measured defaults (hf_badm/optim/solves/); these are the built-in ones' views.
RHO_OVER_SIGMA: dict[str, float] = {name: solve.rho_over_sigma for name, solve in LOCAL_SOLVES.items()}
ELEMENTWISE_SIGMA: dict[str, float] = {name: solve.elementwise_sigma for name, solve in LOCAL_SOLVES.items()
                                       if solve.elementwise_sigma is not None}
# Learning rates of the optimizers in `hf-badm compare` (each one's best on the small GPT-2 sweep). Plain BADM takes
# the recipe's learning_rate when the recipe is plain BADM's, else its best (3, both sizes); ``badm-<preconditioner>``
# is that variant's own scale.
COMPARE_LEARNING_RATES: dict[str, float] = {"badm": 3.0,
    "adamw_torch": 3e-3, "adamw_torch_fused": 3e-3, "sgd": 0.3, "adafactor": 1e-3, "lion_32bit": 1e-4,
    "schedule_free_adamw": 3e-3, "badm-newton_schulz": 0.03, "badm-normalized": 3e-3, "badm-second_moment": 10.0, "muon": 0.03,
    "normuon": 0.03, "badm-normuon": 0.03, "badm-nsisa": 0.03, "muon_qhadam": 0.03,
}
# The demo trains the tiny GPT-2, where AdamW's optimum was 1e-2: the demo compares tuned against tuned.
DEMO_LEARNING_RATES: dict[str, float] = {"adamw_torch": 1e-2}


def default_rho(preconditioner: str, sigma: float) -> float:
    """rho when the user gives only sigma (or a learning rate): the local solve's measured rho/sigma (the paper's
    beta = 0.9 for a solve without a measured default)."""
    return LOCAL_SOLVES[preconditioner].rho_over_sigma * sigma
