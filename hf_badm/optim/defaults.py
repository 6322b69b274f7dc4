"""Tuned defaults: the one table every part of hf_badm reads (optimizer, config, CLI, benchmarks).

Each number was measured by ``scripts/bench_convergence.py`` (tiny GPT-2 2x64, 300 steps, and small
GPT-2 4x128, 150 steps, on the built-in corpus; every sweep point in docs/results/convergence/,
the tables in docs/benchmarks.md and docs/preconditioners.md). Change a number here only with a
new measurement recorded there.
"""

from __future__ import annotations

__all__ = ["RHO_OVER_SIGMA", "ELEMENTWISE_SIGMA", "SGD_SCALE_MIN_LR", "ADAM_SCALE_MAX_LR",
           "COMPARE_LEARNING_RATES", "DEMO_LEARNING_RATES", "default_rho"]

# rho/sigma per local solve. Plain and normalized BADM: beta = rho/(rho+sigma) = 0.9 (robust at both sizes);
# newton_schulz: rho = sigma (its direction carries its own momentum; at rho = sigma it is Muon);
# second_moment: sigma << rho sqrt(v) (sigma 0.1 with rho 600 was the best grid point).
RHO_OVER_SIGMA: dict[str, float] = {"none": 9.0, "second_moment": 6000.0, "newton_schulz": 1.0, "normalized": 9.0}
# sigma of the tensors a newton_schulz optimizer does not orthogonalise (embeddings, head, norms, biases),
# per elementwise local solve: normalized lr 0.1 was best at both sizes; second_moment sigma 0.1.
ELEMENTWISE_SIGMA: dict[str, float] = {"second_moment": 0.1, "normalized": 10.0}
# Plain BADM takes SGD-scale steps: its best lr was 3 (tiny) and 3 (small), lr 1 still within 1.4x of the best
# loss, and lr 1e-2 (AdamW's scale) barely trains (eval 6.05 vs 5.21 at lr 3): a learning rate below this warns.
SGD_SCALE_MIN_LR = 0.3
# preconditioner="normalized" steps like AdamW: at 0.03 the sweeps' eval loss was 3x its best (2.33 vs 0.78 on tiny,
# 4.5 on small), and from 0.1 up it diverged: a learning rate from this one up warns.
ADAM_SCALE_MAX_LR = 0.03
# Learning rates of the optimizers in `hf-badm compare` (each one's best on the small GPT-2 sweep). Plain BADM takes
# the recipe's learning_rate when the recipe is plain BADM's, else its best (3, both sizes); ``badm-<preconditioner>``
# is that variant's own scale.
COMPARE_LEARNING_RATES: dict[str, float] = {"badm": 3.0,
    "adamw_torch": 3e-3, "adamw_torch_fused": 3e-3, "sgd": 0.3, "adafactor": 1e-3, "lion_32bit": 1e-4,
    "schedule_free_adamw": 3e-3, "badm-newton_schulz": 0.03, "badm-normalized": 3e-3, "badm-second_moment": 10.0, "muon": 0.03,
}
# The demo trains the tiny GPT-2, where AdamW's optimum was 1e-2: the demo compares tuned against tuned.
DEMO_LEARNING_RATES: dict[str, float] = {"adamw_torch": 1e-2}


def default_rho(preconditioner: str, sigma: float) -> float:
    """rho when the user gives only sigma (or a learning rate): the measured rho/sigma of the local solve
    (the paper's beta = 0.9 for a local solve without a measured default)."""
    return RHO_OVER_SIGMA.get(preconditioner, RHO_OVER_SIGMA["none"]) * sigma
