r"""``preconditioner="newton_schulz"`` (NSISA-like): on weight matrices the local direction is
Newton-Schulz orthogonalised Nesterov momentum (Muon's direction)::

    M <- mu M + g;   d = NS5(g + mu M) * max(1, rows/cols)**0.5

used in place of the gradient in the paper's local solve (scalar gain, D = sigma + rho). A 3-D tensor is a
stack of matrices (MoE experts fused as ``(experts, out, in)``): each expert slice is orthogonalised on its
own, as if the experts were separate linear layers. The orthogonalisation itself is ``BADM.orthogonalizer``
(all of a step's matrices in one call); every other tensor falls back to ``second_moment`` (unless its
param group is ``strict``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from hf_badm.optim.local_solve import LocalSolve, register_local_solve

__all__ = ["NewtonSchulz", "ns_applies", "register_matrix_layout", "matrix_layout", "MATRIX_DIMS"]


# Flat tensors that hold (partitions of) several whole matrices, e.g. DeepSpeed ZeRO's fp32 partitions, each with the
# object that describes where its matrices are (opaque here: the orthogonaliser of hf_badm.parallel reads it). Kept
# beside the tensors, weakly, rather than on them: a tensor's attributes would travel into its checkpoints.
_MATRIX_LAYOUTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def register_matrix_layout(p: Tensor, layout: Any) -> None:
    """Declare ``p`` a flat partition of whole matrices, described by ``layout`` for the orthogonaliser."""
    _MATRIX_LAYOUTS[p] = layout


def matrix_layout(p: Tensor) -> Any:
    """The layout registered for ``p``, or None."""
    return _MATRIX_LAYOUTS.get(p)


MATRIX_DIMS = (2, 3)  # a matrix, or a stack of expert matrices


def ns_applies(p: Tensor) -> bool:
    """Newton-Schulz acts on matrices and stacks of expert matrices by their whole shape (the one place this rule
    lives: a DTensor's ``dim()`` is its global one), or on a flat partition registered with the whole matrices it
    belongs to (:func:`register_matrix_layout`). The caller that builds param groups decides from the whole shape of
    a partitioned parameter (``hf_badm.parallel.full_shape``) and keeps embeddings out."""
    return NewtonSchulz.takes_shape(p.shape) or p in _MATRIX_LAYOUTS


@register_local_solve
class NewtonSchulz(LocalSolve):
    name = "newton_schulz"
    state_keys = ("momentum_buffer",)
    orthogonalises = True
    fallback = "second_moment"
    applies = staticmethod(ns_applies)

    @staticmethod
    def takes_shape(shape: torch.Size) -> bool:
        return len(shape) in MATRIX_DIMS

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
