"""Optimizers: the math, with no Hugging Face imports."""

from hf_badm.optim.badm import BADM, NonFiniteGradientError

__all__ = ["BADM", "NonFiniteGradientError"]
