"""BADM's settings, each described once: its type, default, check and help.

``BADM(...)`` takes its defaults from here and checks its arguments with these checks; ``BADMConfig`` builds its
fields (and so the recipe loader's and the CLI's options, through ``HfArgumentParser``) from the same objects. The
settings of the local solves (``beta2``, ``ns_steps``, ...) are described by their solve (its ``settings`` defaults
and ``check_settings``): :func:`solve_settings` gives them as :class:`Setting` objects too. A default that depends on
another setting is computed by one function here (:func:`default_rho`) and nowhere else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hf_badm.optim import solves  # noqa: F401  (registers the built-in local solves)
from hf_badm.optim.local_solve import LOCAL_SOLVES
from hf_badm.optim.solves.newton_schulz import NS_DTYPES
from hf_badm.optim.validation import one_of, penalty

__all__ = ["Setting", "SIGMA", "RHO", "MODE", "NONFINITE", "PRECONDITIONER", "NS_DTYPE", "OPTIMIZER_SETTINGS",
           "MODES", "NONFINITE_ACTIONS", "solve_settings", "default_rho"]

MODES = ("fused", "per_sub_batch")
NONFINITE_ACTIONS = ("skip", "raise")


@dataclass(frozen=True)
class Setting:
    """One setting: ``check(value)`` raises ValueError naming it (``None`` passes where ``default`` is None: the
    default is then computed from other settings). ``choices`` lists the allowed names of a choice, when called (the
    preconditioners are whatever solves are registered by then)."""

    name: str
    type: type
    default: Any
    help: str
    validate: Callable[[str, Any], Any]
    choices: Callable[[], tuple[str, ...]] | None = None

    def check(self, value: Any) -> None:
        if value is None and self.default is None:
            return
        if self.choices is not None:
            one_of(self.name, value, self.choices())
        else:
            self.validate(self.name, value)

    def field(self) -> Any:
        """This setting as a dataclass field (default, help, choices) for ``HfArgumentParser``."""
        metadata: dict[str, Any] = {"help": self.help}
        if self.choices is not None:
            metadata["choices"] = list(self.choices())
        return dataclasses.field(default=self.default, metadata=metadata)


SIGMA = Setting("sigma", float, None, "BADM penalty sigma > 0; the step size is 1/sigma. Default: 1 / learning_rate.",
                penalty)
RHO = Setting("rho", float, None, "BADM proximal coefficient rho > 0; momentum beta = rho/(rho+sigma). Default: the "
              "local solve's measured rho/sigma times sigma: 9 * sigma (beta 0.9) for the paper's BADM and normalized, "
              "sigma for newton_schulz, 6000 * sigma for second_moment.", penalty)
MODE = Setting("mode", str, "fused", "'fused': one buffer, consumes the accumulated/reduced gradient (exact for steady "
               "weights). 'per_sub_batch': literal per-slot duals, one slot per sub-batch.", one_of, lambda: MODES)
NONFINITE = Setting("nonfinite", str, "skip", "On a NaN/Inf gradient: 'skip' the step (or sub-batch) with a warning, "
                    "or 'raise'.", one_of, lambda: NONFINITE_ACTIONS)
PRECONDITIONER = Setting(
    "preconditioner", str, "none",
    "Local-solve preconditioner: 'none' (the paper's BADM), 'second_moment' (SISA-like, D = sigma + rho (sqrt(v) + "
    "eps)), 'newton_schulz' (NSISA-like: orthogonalised momentum on hidden weight matrices, elementwise_preconditioner "
    "elsewhere; fused at rho = sigma, its default, it is Muon on the matrices), 'normalized' (QHAdam-like: the gradient "
    "divided by its RMS sqrt(v) replaces it in the local solve; Adam-scale learning rates).", one_of,
    lambda: tuple(LOCAL_SOLVES))
NS_DTYPE = Setting("ns_dtype", str, "auto", "newton_schulz: the dtype of the Newton-Schulz iterations. 'auto': bfloat16 "
                   "on CUDA (as torch.optim.Muon), float32 elsewhere.", one_of, lambda: tuple(NS_DTYPES))
# The settings of BADM(...) that BADMConfig also holds, by name.
OPTIMIZER_SETTINGS: dict[str, Setting] = {s.name: s for s in (SIGMA, RHO, MODE, NONFINITE, PRECONDITIONER, NS_DTYPE)}


def solve_settings() -> dict[str, Setting]:
    """The settings of every registered local solve: default and check are the solve's own (its ``settings`` and
    ``check_settings``), so a solve registered later adds its settings here by registering."""
    out: dict[str, Setting] = {}
    for solve in LOCAL_SOLVES.values():
        for key, default in solve.settings.items():
            out.setdefault(key, Setting(key, type(default), default, f"{solve.name}'s setting (hf_badm.optim.solves)",
                                        _solve_check(solve.check_settings)))
    return out


def _solve_check(check: Callable[[dict[str, Any]], None]) -> Callable[[str, Any], None]:
    return lambda name, value: check({name: value})


def default_rho(preconditioner: str, sigma: float) -> float:
    """rho when only sigma (or a learning rate) is given: the local solve's measured rho/sigma (the paper's beta = 0.9
    for a solve without a measured default). The one place this default is computed."""
    return LOCAL_SOLVES[preconditioner].rho_over_sigma * sigma
