r"""``preconditioner="newton_schulz"`` (NSISA-like): on weight matrices the local direction is
Newton-Schulz orthogonalised Nesterov momentum (Muon's direction)::

    M <- mu M + g;   d = NS5(g + mu M) * max(1, rows/cols)**0.5

used in place of the gradient in the paper's local solve (scalar gain, D = sigma + rho). A 3-D tensor is a
stack of matrices (MoE experts fused as ``(experts, out, in)``): each expert slice is orthogonalised on its
own, as if the experts were separate linear layers. The orthogonalisation itself is ``BADM.orthogonalizer``
(all of a step's matrices in one call); every other tensor falls back to ``second_moment`` (unless its
param group is ``strict``).

Settings (param-group keys): ``ns_momentum`` (mu, 0.95), ``ns_steps`` (5), ``ns_coefficients`` (``"muon"``: the
quintic (3.4445, -4.7750, 2.0315) every iteration; ``"polar_express"``: Polar Express's polynomial per
iteration) and ``ns_lr_scale`` (``"original"``: the scale sqrt(max(1, rows/cols)); ``"match_rms_adamw"``:
0.2 sqrt(max(rows, cols)), Moonshot's, whose update RMS matches AdamW's so that the matrices share AdamW's lr and
weight decay). rho = sigma by default: at rho = sigma fused mode is Muon.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from hf_badm.optim.local_solve import LocalSolve, register_local_solve
from hf_badm.optim.preconditioned import (NS_COEFFICIENTS, NS_LR_SCALES, WHOLE, Iterations, MatrixView, NSSchedule,
                                          polar_express)
from hf_badm.optim.validation import count, fraction, one_of

__all__ = ["NewtonSchulz", "ns_applies", "register_matrix_layout", "matrix_layout", "MATRIX_DIMS", "whole_matrices",
           "register_matrix_view", "matrix_view"]

NS_COEFFICIENT_SETS = ("muon", "polar_express")


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


# Which linear maps each weight holds (transposed storage, a fused projection's parts), registered by whoever knows
# what the weight is (``hf_badm.factory`` from ``hf_badm.roles``); kept weakly beside the tensors, as the layouts.
_MATRIX_VIEWS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def register_matrix_view(p: Tensor, view: MatrixView) -> None:
    """Declare how ``p`` holds its linear maps (:class:`MatrixView`); the whole untransposed tensor is the default."""
    if view == WHOLE:
        _MATRIX_VIEWS.pop(p, None)
    else:
        _MATRIX_VIEWS[p] = view


def matrix_view(p: Tensor) -> MatrixView:
    """The :class:`MatrixView` registered for ``p`` (default: the whole tensor, as stored)."""
    return _MATRIX_VIEWS.get(p, WHOLE)


MATRIX_DIMS = (2, 3)  # a matrix, or a stack of expert matrices


def ns_applies(p: Tensor) -> bool:
    """Newton-Schulz acts on matrices and stacks of expert matrices by their whole shape (the one place this rule
    lives: a DTensor's ``dim()`` is its global one), or on a flat partition registered with the whole matrices it
    belongs to (:func:`register_matrix_layout`). The caller that builds param groups decides from the whole shape of
    a partitioned parameter (``hf_badm.parallel.full_shape``) and keeps embeddings out."""
    return NewtonSchulz.takes_shape(p.shape) or p in _MATRIX_LAYOUTS


def whole_matrices(params: list[Tensor], what: str) -> None:
    """Refuse flat partitions of several matrices (DeepSpeed ZeRO): ``what`` needs each matrix's shape."""
    if any(p in _MATRIX_LAYOUTS for p in params):
        raise ValueError(f"{what} needs each matrix's own shape, and this parameter is a flat DeepSpeed ZeRO partition "
                         "of several matrices: use it without ZeRO (DDP, or FSDP2)")


@register_local_solve
class NewtonSchulz(LocalSolve):
    name = "newton_schulz"
    state_keys = ("momentum_buffer",)
    orthogonalises = True
    fallback = "second_moment"
    applies = staticmethod(ns_applies)
    settings = {"ns_momentum": 0.95, "ns_steps": 5, "ns_coefficients": "muon", "ns_lr_scale": "original"}
    rho_over_sigma = 1.0  # its direction carries its own momentum; at rho = sigma it is Muon

    @classmethod
    def check_settings(cls, group: dict[str, Any]) -> None:
        if "ns_momentum" in group:
            fraction("ns_momentum", group["ns_momentum"])
        if "ns_steps" in group:
            count("ns_steps", group["ns_steps"])
        if "ns_coefficients" in group:
            one_of("ns_coefficients", group["ns_coefficients"], NS_COEFFICIENT_SETS)
        if "ns_lr_scale" in group:
            one_of("ns_lr_scale", group["ns_lr_scale"], NS_LR_SCALES)

    def iterations(self, group: dict[str, Any]) -> Iterations:
        """Muon's quintic ``ns_steps`` times (a count), or a schedule with Polar Express's polynomials and/or
        another lr scale (the orthogonaliser scales every map, each part of a fused projection on its own)."""
        steps, rule = group["ns_steps"], group["ns_lr_scale"]
        if group["ns_coefficients"] == "polar_express":
            return replace(polar_express(steps), lr_scale=rule)
        return steps if rule == "original" else NSSchedule((NS_COEFFICIENTS,) * steps, 1.0, rule)

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
