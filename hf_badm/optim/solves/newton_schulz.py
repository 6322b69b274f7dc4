r"""``preconditioner="newton_schulz"`` (NSISA-like): on weight matrices the local direction is
Newton-Schulz orthogonalised Nesterov momentum (Muon's direction)::

    M <- mu M + g;   d = NS5(g + mu M) * max(1, rows/cols)**0.5

used in place of the gradient in the paper's local solve (scalar gain, D = sigma + rho). The
orthogonalisation itself is ``BADM.orthogonalizer`` (all of a step's matrices in one call); every
tensor that is not a matrix falls back to ``second_moment``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hf_badm.optim.local_solve import LocalSolve, register_local_solve

__all__ = ["NewtonSchulz", "ns_applies"]


def ns_applies(p: Tensor) -> bool:
    """Newton-Schulz acts on whole 2-D weight matrices only (the one place this rule lives)."""
    return p.dim() == 2


@register_local_solve
class NewtonSchulz(LocalSolve):
    name = "newton_schulz"
    state_keys = ("momentum_buffer",)
    orthogonalises = True
    fallback = "second_moment"
    applies = staticmethod(ns_applies)

    def new_state(self, p: Tensor) -> dict[str, Any]:
        return {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def directions(self, grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any],
                   foreach: bool) -> tuple[list[Tensor], None]:
        """The Newton-Schulz inputs ``g + mu M`` (after ``M <- mu M + g``)."""
        mu, bufs = group["ns_momentum"], [s["momentum_buffer"] for s in states]
        if foreach:
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads)
            return torch._foreach_add(grads, bufs, alpha=mu), None
        for m, g in zip(bufs, grads):
            m.mul_(mu).add_(g)
        return [g.add(m, alpha=mu) for g, m in zip(grads, bufs)], None
