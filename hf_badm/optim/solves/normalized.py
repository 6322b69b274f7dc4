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
from hf_badm.optim.moments import (SECOND_MOMENT_SETTINGS, check_second_moment_settings, fold_second_moments,
                                          rms_denominators)

# It steps like AdamW: at 0.03 the sweeps' eval loss was 3x its best (2.33 vs 0.78 on tiny, 4.5 on small), and from
# 0.1 up it diverged: a learning rate from this one up warns.
ADAM_SCALE_MAX_LR = 0.03


@register_local_solve
class Normalized(LocalSolve):
    """rho/sigma 9: the dual recurrence is its momentum (4: 1.169, 9: 0.780, 19: 0.804 on the tiny model). As the
    solve of the tensors newton_schulz leaves, lr 0.1 (sigma 10) was the best of 0.003-0.3 at both sizes."""

    name = "normalized"
    state_keys = ("exp_avg_sq", "steps")
    settings = SECOND_MOMENT_SETTINGS
    elementwise_sigma = 10.0
    check_settings = staticmethod(check_second_moment_settings)

    @classmethod
    def lr_warning(cls, lr: float) -> str | None:
        if lr < ADAM_SCALE_MAX_LR:
            return None
        return (f"learning_rate={lr:g} looks like an SGD learning rate, but preconditioner='normalized' takes "
                "RMS-normalised, AdamW-scale steps: it would diverge. Use an AdamW learning rate (1e-3 to 1e-2), or "
                "set BADMConfig(sigma=...).")

    def new_state(self, p: Tensor) -> dict[str, Any]:
        return {"exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format), "steps": 0}

    def directions(self, grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any],
                   foreach: bool) -> tuple[list[Tensor], None]:
        vs, steps = fold_second_moments(grads, states, group["beta2"], foreach)
        denom = rms_denominators(vs, steps, group["beta2"], group["eps"], foreach)
        if not foreach:
            return [g / d for g, d in zip(grads, denom)], None
        return torch._foreach_div(grads, denom), None
