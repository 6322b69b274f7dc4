"""The learning rates ``hf-badm compare`` and ``hf-badm demo`` give each optimizer, and the rule that picks one.

Each number is that optimizer's best on the small GPT-2 sweep (``scripts/bench_convergence.py``, tiny GPT-2 2x64 and
small GPT-2 4x128 on the built-in corpus; every sweep point in docs/results/convergence/, the tables in
docs/benchmarks.md and docs/preconditioners.md). On real text (docs/benchmarks.md, "Real corpora: BADM beyond Muon")
the geometric mean over the 12 places chose the same rates for Muon (0.03, AdamW 0.1 elsewhere) and newton_schulz
(0.03, normalized 0.1 elsewhere). Change a number here only with a new measurement recorded there. These are the
application's tables: the optimizer's own defaults (rho/sigma, the elementwise sigma) belong to each local solve.
"""

from __future__ import annotations

from typing import Any

from hf_badm.app import RecipeError
from hf_badm.optim.local_solve import LOCAL_SOLVES, plain_solve

__all__ = ["COMPARE_LEARNING_RATES", "DEMO_LEARNING_RATES", "COMPARE_RULE", "compare_learning_rate",
           "refuse_shared_learning_rate"]

# ``badm`` is the paper's BADM (plain BADM's best: 3, both sizes); ``badm-<preconditioner>`` that variant's own scale.
COMPARE_LEARNING_RATES: dict[str, float] = {
    "badm": 3.0, "adamw_torch": 3e-3, "adamw_torch_fused": 3e-3, "sgd": 0.3, "adafactor": 1e-3, "lion_32bit": 1e-4,
    "schedule_free_adamw": 3e-3, "badm-newton_schulz": 0.03, "badm-normalized": 3e-3, "badm-second_moment": 10.0,
    "muon": 0.03, "normuon": 0.03, "badm-normuon": 0.03, "badm-nsisa": 0.03, "muon_qhadam": 0.03,
}
# The demo trains the tiny GPT-2, where AdamW's optimum was 1e-2: the demo compares tuned against tuned.
DEMO_LEARNING_RATES: dict[str, float] = {"adamw_torch": 1e-2}
# What compare_learning_rate does, for `hf-badm compare --help`.
COMPARE_RULE = ("Each optimizer runs at the rate given here, else at its default ({defaults}); badm (the paper's BADM, "
                "no preconditioner, even on a recipe that names one) at the recipe's learning_rate when the recipe is "
                "plain BADM's, else at its default. Each run prints its rate and where it came from. The shared "
                "--learning_rate is refused: it would set every optimizer's rate, AdamW's included.")


def compare_learning_rate(optimizer: str, recipe: dict[str, Any], given: dict[str, float]) -> tuple[float | None, str]:
    """``(learning rate, where it came from)`` of ``optimizer``'s run in ``hf-badm compare`` on ``recipe`` with
    ``--learning_rates`` ``given`` (None: the recipe's, for an optimizer this table does not know)."""
    if optimizer in given:
        return given[optimizer], "--learning_rates"
    recipe_is_plain_badm = (recipe.get("optimizer", "badm") == "badm"
                            and LOCAL_SOLVES[recipe.get("preconditioner", plain_solve())].plain)
    if optimizer == "badm" and recipe_is_plain_badm and "learning_rate" in recipe:
        return None, "the recipe's learning_rate (the recipe is plain BADM's)"
    if optimizer in COMPARE_LEARNING_RATES:
        return COMPARE_LEARNING_RATES[optimizer], "its default (hf_badm.app.learning_rates)"
    return None, "the recipe's learning_rate (no default for it)"


def refuse_shared_learning_rate(overrides: list[str]) -> None:
    """``--learning_rate`` after a compare's recipe would set every optimizer's rate and hide the per-optimizer ones."""
    if any(t == "--learning_rate" or t.startswith("--learning_rate=") for t in overrides):
        raise RecipeError("--learning_rate would run every optimizer (AdamW's included) at one rate and drop their "
                          "defaults: give rates per optimizer, --learning_rates badm=1.0,adamw=1e-3")
