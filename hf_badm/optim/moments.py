"""The second-moment math the elementwise local solves share (hf_badm.optim.solves; docs/preconditioners.md): the
EMA of squared gradients, its bias-corrected RMS denominator and the scalar gains built from it.

Written in step sizes where a schedule enters: ``ratio`` = rho/sigma is fixed under a schedule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hf_badm.optim.validation import fraction, positive

__all__ = ["SECOND_MOMENT_SETTINGS", "check_second_moment_settings", "fold_second_moments", "rms_denominator",
           "rms_denominators", "second_moment_gain", "gains_of_"]

# The second-moment EMA's settings (second_moment and normalized share them: one key each in a param group).
SECOND_MOMENT_SETTINGS: dict[str, Any] = {"beta2": 0.999, "eps": 1e-8}


def check_second_moment_settings(group: dict[str, Any]) -> None:
    if "beta2" in group:
        fraction("beta2", group["beta2"])
    if "eps" in group:
        positive("eps", group["eps"])


def fold_second_moments(grads: list[Tensor], states: list[dict[str, Any]], beta2: float,
                        foreach: bool) -> tuple[list[Tensor], list[int]]:
    """``v <- beta2 v + (1 - beta2) g**2`` in place and ``steps += 1`` for each state; returns (v, steps)."""
    vs = [s["exp_avg_sq"] for s in states]
    for s in states:
        s["steps"] += 1
    if foreach:
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1.0 - beta2)
    else:
        for v, g in zip(vs, grads):
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    return vs, [s["steps"] for s in states]


def rms_denominator(v: Tensor, steps: int, beta2: float, eps: float) -> Tensor:
    """``q = sqrt(v / (1 - beta2**steps)) + eps`` (bias-corrected), a new tensor."""
    return (v / (1.0 - beta2**steps)).sqrt_().add_(eps)


def rms_denominators(vs: list[Tensor], steps: list[int], beta2: float, eps: float, foreach: bool) -> list[Tensor]:
    """:func:`rms_denominator` of each second moment (new tensors), with foreach kernels when ``foreach``."""
    if not foreach:
        return [rms_denominator(v, k, beta2, eps) for v, k in zip(vs, steps)]
    denom = torch._foreach_div(vs, [1.0 - beta2**k for k in steps])
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    return denom


def second_moment_gain(v: Tensor, steps: int, ratio: float, beta2: float, eps: float) -> Tensor:
    """k = sigma / (sigma + rho q) = 1 / (1 + ratio q)."""
    return rms_denominator(v, steps, beta2, eps).mul_(ratio).add_(1.0).reciprocal_()


def gains_of_(qs: list[Tensor], ratio: float) -> list[Tensor]:
    """k = 1 / (1 + ratio q) for each q, in place (foreach)."""
    torch._foreach_mul_(qs, ratio)
    torch._foreach_add_(qs, 1.0)
    torch._foreach_reciprocal_(qs)
    return qs


