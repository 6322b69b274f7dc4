"""Optimizers: the math, with no Hugging Face imports."""

from hf_badm.optim.badm import BADM, NonFiniteGradientError
from hf_badm.optim.local_solve import LOCAL_SOLVES, LocalSolve, register_local_solve
from hf_badm.optim.solves import ns_applies

__all__ = ["BADM", "NonFiniteGradientError", "LocalSolve", "LOCAL_SOLVES", "register_local_solve", "ns_applies"]
