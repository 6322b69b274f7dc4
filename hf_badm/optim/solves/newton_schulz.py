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
from torch.utils.weak import WeakIdKeyDictionary

from hf_badm.optim.local_solve import LocalSolve, register_local_solve

__all__ = ["NewtonSchulz", "ns_applies", "register_matrix_layout", "matrix_layout"]


# Flat tensors that hold (partitions of) several whole matrices, e.g. DeepSpeed ZeRO's fp32 partitions, each with the
# object that gathers its matrices and scatters their directions back (hf_badm.distributed.ZeroMatrixLayout). Kept
# beside the tensors, weakly, rather than on them: a tensor's attributes would travel into its checkpoints.
_MATRIX_LAYOUTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def register_matrix_layout(p: Tensor, layout: Any) -> None:
    """Declare ``p`` a flat partition of whole matrices; ``layout.gather(x) -> matrices`` and
    ``layout.scatter(directions, like=x) -> partition`` (collectives: every rank calls them in the same order)."""
    _MATRIX_LAYOUTS[p] = layout


def matrix_layout(p: Tensor) -> Any:
    """The layout registered for ``p``, or None."""
    return _MATRIX_LAYOUTS.get(p)


def ns_applies(p: Tensor) -> bool:
    """Newton-Schulz acts on whole 2-D weight matrices only (the one place this rule lives), or on a flat partition
    registered with the whole matrices it belongs to (:func:`register_matrix_layout`)."""
    return p.dim() == 2 or p in _MATRIX_LAYOUTS


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
