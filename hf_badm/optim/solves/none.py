"""``preconditioner="none"``: the paper's local solve, one gradient step, w_s = w - (g_s + pi_s) / (sigma + rho)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from hf_badm.optim.local_solve import LocalSolve, register_local_solve


@register_local_solve
class Plain(LocalSolve):
    """Direction ``d = g``, scalar gain: no state of its own."""

    name = "none"

    def directions(self, grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any],
                   foreach: bool) -> tuple[list[Tensor], None]:
        return grads, None
