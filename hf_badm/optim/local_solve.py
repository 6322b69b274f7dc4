r"""The local solve of BADM as a strategy: one :class:`LocalSolve` per ``preconditioner=``.

BADM's local solve of sub-batch s, written for every preconditioner as::

    w_s = w - k_s (d_s + pi_s) / sigma,        k_s = sigma / (sigma + rho q_s)

A local solve gives the **direction** ``d_s`` (the gradient, or a transform of it) and the **gain**
``k_s`` (the scalar ``sigma / (sigma + rho)`` when ``q_s = 1``, or elementwise). Everything else (the
dual update ``pi_s <- pi_s - k_s (d_s + pi_s)``, the aggregation, both modes) is BADM's
(``hf_badm.optim.badm``): fused mode runs the solve once on the reduced gradient with one shared
state, per-sub-batch mode once per slot with that slot's state.

A new preconditioner is one subclass in one file, registered with :func:`register_local_solve`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["LocalSolve", "LOCAL_SOLVES", "register_local_solve", "local_solve_for", "keeps_dual"]


class LocalSolve:
    """One preconditioner of the local solve. Subclasses set the class attributes and implement
    :meth:`new_state` and :meth:`directions`; they hold no state themselves (it lives in the optimizer).

    ``name``: the ``preconditioner=`` value. ``state_keys``: its per-parameter state (in fused mode one
    value per key; in per-sub-batch mode a list per key, one entry per slot). ``gains``: whether
    :meth:`directions` returns elementwise gains (else the gain is the scalar sigma / (sigma + rho)).
    ``orthogonalises``: the directions are inputs for ``BADM.orthogonalizer`` (Newton-Schulz), which turns
    all of a step's inputs into directions in one call. ``fallback``: the solve of the tensors
    :meth:`applies` rejects.
    """

    name: ClassVar[str]
    state_keys: ClassVar[tuple[str, ...]] = ()
    gains: ClassVar[bool] = False
    orthogonalises: ClassVar[bool] = False
    fallback: ClassVar[str | None] = None

    @staticmethod
    def takes_shape(shape: torch.Size) -> bool:
        """Whether this solve acts on a parameter of this whole shape (what builds param groups asks, with the shape
        of the whole tensor even where an engine holds a partition of it)."""
        return True

    @classmethod
    def applies(cls, p: Tensor) -> bool:
        """Whether this solve acts on ``p``, the tensor the step holds (else ``fallback`` does)."""
        return cls.takes_shape(p.shape)

    def new_state(self, p: Tensor) -> dict[str, Any]:
        """The state of ``p`` before its first step (one slot's, in per-sub-batch mode)."""
        return {}

    def directions(self, grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any],
                   foreach: bool) -> tuple[list[Tensor], list[Tensor] | None]:
        """Fold ``grads`` into ``states`` (in place) and return the directions ``d`` and, when ``gains``,
        the elementwise gains ``k = 1 / (1 + (rho/sigma) q)``. ``grads`` must not be modified."""
        raise NotImplementedError


LOCAL_SOLVES: dict[str, LocalSolve] = {}


def register_local_solve(cls: type[LocalSolve]) -> type[LocalSolve]:
    """Class decorator: make ``cls`` available as ``BADM(preconditioner=cls.name)``."""
    LOCAL_SOLVES[cls.name] = cls()
    return cls


def local_solve_for(group: dict[str, Any], p: Tensor) -> LocalSolve:
    """The solve of ``p`` in ``group``: the group's preconditioner, or its fallback where it does not apply. A
    ``strict`` group has no fallback: every tensor is the group's solve's (whether it can act on it is checked
    when the step runs, where an engine may since have said what the tensor is)."""
    solve = LOCAL_SOLVES[group["preconditioner"]]
    if group.get("strict"):
        return solve
    while not solve.applies(p) and solve.fallback is not None:
        solve = LOCAL_SOLVES[solve.fallback]
    return solve


def keeps_dual(group: dict[str, Any], solve: LocalSolve) -> bool:
    """Whether fused mode needs BADM's buffer m = -pi_bar for ``solve`` in ``group``. With a scalar gain it
    enters the update only through c = 1/rho_t - 1/sigma_t = (sigma/rho - 1)/sigma_t, which is 0 at every
    step when rho = sigma; a solve with state of its own (which marks the parameter's history) then does
    without m. The elementwise-gain form always needs it."""
    return solve.gains or group["sigma"] != group["rho"] or not solve.state_keys
