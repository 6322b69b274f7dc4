r"""``preconditioner="normalized"`` (QHAdam-like): ``d_s = g_s / (sqrt(v_hat_s) + eps)`` replaces the
gradient in the paper's local solve (scalar gain, D = sigma + rho).

The duals then average RMS-normalised directions, so the ``pi / sigma`` term is on Adam's scale
(Adam-scale ``lr``). With ``v`` fixed within a step ``d`` is linear in ``g``: fused mode with one
shared ``v`` is again an exact algorithm (plain BADM on ``d``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hf_badm.optim.local_solve import LocalSolve, register_local_solve
from hf_badm.optim.preconditioned import fold_second_moments, rms_denominator


@register_local_solve
class Normalized(LocalSolve):
    name = "normalized"
    state_keys = ("exp_avg_sq", "steps")

    def new_state(self, p: Tensor) -> dict[str, Any]:
        return {"exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format), "steps": 0}

    def directions(self, grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any],
                   foreach: bool) -> tuple[list[Tensor], None]:
        vs, steps = fold_second_moments(grads, states, group["beta2"], foreach)
        beta2, eps = group["beta2"], group["eps"]
        if not foreach:
            return [g / rms_denominator(v, k, beta2, eps) for g, v, k in zip(grads, vs, steps)], None
        denom = torch._foreach_div(vs, [1.0 - beta2**k for k in steps])
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        return torch._foreach_div(grads, denom), None
