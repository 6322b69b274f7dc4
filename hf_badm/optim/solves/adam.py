r"""``preconditioner="adam"``: Adam's bias-corrected direction replaces the gradient in the paper's local solve::

    m <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g**2
    d = (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps)

with the scalar gain D = sigma + rho. At rho = sigma (its default) the dual drops out of fused mode and the step is
AdamW's (decoupled weight decay, lr = 1/sigma): it is offered for the tensors an orthogonalising solve leaves, so that
newton_schulz's embeddings, head, norms and biases can take exactly what Muon's peer gives them (AdamW), and a
difference between BADM and Muon is then the matrices' alone. rho != sigma adds BADM's dual over Adam's directions.
Per-sub-batch mode keeps m and v per slot.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hf_badm.optim.local_solve import LocalSolve, register_local_solve
from hf_badm.optim.moments import (SECOND_MOMENT_SETTINGS, check_second_moment_settings, fold_second_moments,
                                          rms_denominators)
from hf_badm.optim.validation import fraction


@register_local_solve
class Adam(LocalSolve):
    """lr 0.1 (sigma 10) on the tensors newton_schulz leaves, as the Muon peer's AdamW (``hf_badm.peers``)."""

    name = "adam"
    state_keys = ("exp_avg", "exp_avg_sq", "steps")
    settings = {**SECOND_MOMENT_SETTINGS, "beta1": 0.9}
    rho_over_sigma = 1.0  # the dual drops out: AdamW
    elementwise_sigma = 10.0

    @classmethod
    def check_settings(cls, group: dict[str, Any]) -> None:
        check_second_moment_settings(group)
        if "beta1" in group:
            fraction("beta1", group["beta1"])

    def new_state(self, p: Tensor) -> dict[str, Any]:
        return {"exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format), "steps": 0}

    def directions(self, grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any],
                   foreach: bool) -> tuple[list[Tensor], None]:
        vs, steps = fold_second_moments(grads, states, group["beta2"], foreach)
        beta1 = group["beta1"]
        ms = [s["exp_avg"] for s in states]
        denom = rms_denominators(vs, steps, group["beta2"], group["eps"], foreach)
        corrections = [1.0 - beta1**k for k in steps]
        if not foreach:
            for m, g in zip(ms, grads):
                m.lerp_(g, 1.0 - beta1)
            return [m / d.mul_(c) for m, d, c in zip(ms, denom, corrections)], None
        torch._foreach_lerp_(ms, grads, 1.0 - beta1)
        torch._foreach_mul_(denom, corrections)
        return torch._foreach_div(ms, denom), None
