r"""``preconditioner="second_moment"`` (SISA-like): ``w_s = w - (g_s + pi_s) / (sigma + rho q_s)``.

``q_s = sqrt(v_hat_s) + eps`` with ``v_s`` a bias-corrected EMA of ``g_s**2``: direction ``d = g``,
elementwise gain ``k = 1 / (1 + (rho/sigma) q)``. With ``q`` fixed within a step the update is linear
in (g, pi), so fused mode with ONE shared ``v`` (from the reduced gradient) is itself an exact
algorithm::

    u  = k (g + pi)
    w <- w - 2 u / sigma + pi / sigma
    pi <- pi - u
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hf_badm.optim.local_solve import LocalSolve, register_local_solve
from hf_badm.optim.moments import (SECOND_MOMENT_SETTINGS, check_second_moment_settings, fold_second_moments,
                                          gains_of_, second_moment_gain)


@register_local_solve
class SecondMoment(LocalSolve):
    """sigma << rho sqrt(v) works: sigma 0.1 with rho 600 was the best grid point (rho/sigma 6000)."""

    name = "second_moment"
    state_keys = ("exp_avg_sq", "steps")
    gains = True
    settings = SECOND_MOMENT_SETTINGS
    rho_over_sigma = 6000.0
    elementwise_sigma = 0.1
    check_settings = staticmethod(check_second_moment_settings)

    def new_state(self, p: Tensor) -> dict[str, Any]:
        return {"exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format), "steps": 0}

    def directions(self, grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any],
                   foreach: bool) -> tuple[list[Tensor], list[Tensor]]:
        vs, steps = fold_second_moments(grads, states, group["beta2"], foreach)
        ratio, beta2, eps = group["rho"] / group["sigma"], group["beta2"], group["eps"]
        if not foreach:
            return grads, [second_moment_gain(v, k, ratio, beta2, eps) for v, k in zip(vs, steps)]
        gains = torch._foreach_div(vs, [1.0 - beta2**k for k in steps])
        torch._foreach_sqrt_(gains)
        torch._foreach_add_(gains, eps)
        return grads, gains_of_(gains, ratio)
