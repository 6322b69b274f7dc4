r"""The local solve of BADM as a strategy: one :class:`LocalSolve` per ``preconditioner=``.

BADM's local solve of sub-batch s, written for every preconditioner as::

    w_s = w - k_s (d_s + pi_s) / sigma,        k_s = sigma / (sigma + rho q_s)

A local solve gives the **direction** ``d_s`` (the gradient, or a transform of it) and the **gain**
``k_s`` (the scalar ``sigma / (sigma + rho)`` when ``q_s = 1``, or elementwise). Everything else (the
dual update ``pi_s <- pi_s - k_s (d_s + pi_s)``, the aggregation, both modes) is BADM's
(``hf_badm.optim.badm``): fused mode runs the solve once on the reduced gradient with one shared
state, per-sub-batch mode once per slot with that slot's state.

A solve owns its facts (nothing outside ``hf_badm.optim.solves`` asks for a solve by name): its settings
(defaults and validation; they live in the param groups), its default rho/sigma and learning-rate scale, which
tensors it acts on, whether it orthogonalises and what it does after that. A new preconditioner is one
subclass in one file, registered with :func:`register_local_solve`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["LocalSolve", "LOCAL_SOLVES", "register_local_solve", "local_solve_for", "keeps_dual", "setting_defaults",
           "check_settings", "elementwise_solves", "plain_solve"]

# Sums tensors over the data-parallel ranks in place (a no-op on one process): what a solve's end_step may call.
Reduce = Callable[[list[Tensor]], None]


class LocalSolve:
    """One preconditioner of the local solve. Subclasses set the class attributes and implement
    :meth:`new_state` and :meth:`directions`; they hold no state themselves (it lives in the optimizer).

    ``name``: the ``preconditioner=`` value. ``state_keys``: its per-parameter state (in fused mode one
    value per key; in per-sub-batch mode a list per key, one entry per slot). ``gains``: whether the solve
    returns elementwise gains (else the gain is the scalar sigma / (sigma + rho)). ``orthogonalises``: the
    directions are inputs for ``BADM.orthogonaliser`` (Newton-Schulz), which turns all of a step's inputs into
    directions in one call; :meth:`finish` then sees them. ``fallback``: the solve of the tensors :meth:`applies`
    rejects. ``settings``: its hyperparameters and their defaults (every param group carries them, as
    per-algorithm settings do in microsoft/dion; ``BADM(**settings)`` overrides them). ``rho_over_sigma``: the
    default rho/sigma. ``elementwise_sigma``: sigma where it serves the tensors an orthogonalising solve leaves
    (None: it is not offered there). ``plain``: the paper's solve (what ``badm`` alone names). ``reads_dual``:
    :meth:`finish` needs the dual.
    """

    name: ClassVar[str]
    state_keys: ClassVar[tuple[str, ...]] = ()
    gains: ClassVar[bool] = False
    orthogonalises: ClassVar[bool] = False
    fallback: ClassVar[str | None] = None
    settings: ClassVar[dict[str, Any]] = {}
    rho_over_sigma: ClassVar[float] = 9.0  # beta = rho / (rho + sigma) = 0.9, the paper's
    elementwise_sigma: ClassVar[float | None] = None
    plain: ClassVar[bool] = False
    reads_dual: ClassVar[bool] = False

    @classmethod
    def check_settings(cls, group: dict[str, Any]) -> None:
        """Raise ValueError for a setting of this solve present in ``group`` that it cannot take."""

    @classmethod
    def lr_warning(cls, lr: float) -> str | None:
        """Why ``lr`` (= 1/sigma) is off this solve's scale, or None."""
        return None

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

    def state_shape(self, key: str, p: Tensor) -> torch.Size:
        """The shape of state tensor ``key`` of ``p`` (what a loaded state is checked against)."""
        return p.shape

    def directions(self, grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any],
                   foreach: bool) -> tuple[list[Tensor], list[Tensor] | None]:
        """Fold ``grads`` into ``states`` (in place) and return the directions ``d`` (for an orthogonalising solve,
        the orthogonaliser's inputs) and, when ``gains``, the elementwise gains ``k = 1 / (1 + (rho/sigma) q)``
        (or None, to give them in :meth:`finish`). ``grads`` must not be modified."""
        raise NotImplementedError

    def iterations(self, group: dict[str, Any]) -> Any:
        """An orthogonalising solve: the ``steps`` argument of ``BADM.orthogonaliser`` for ``group``."""
        raise NotImplementedError

    def finish(self, params: list[Tensor], directions: list[Tensor], gains: list[Tensor] | None,
               duals: list[Tensor] | None, states: list[dict[str, Any]], group: dict[str, Any],
               foreach: bool) -> tuple[list[Tensor], list[Tensor] | None]:
        """The directions and gains the update uses, after orthogonalisation (where the solve orthogonalises):
        may transform the directions and compute gains from them, ``states`` and ``duals`` (the slot's dual pi_s,
        or fused the shared pi_bar; given only when ``reads_dual``). On a sharded engine each direction is this
        rank's piece of its matrix (a DTensor shard, or a flat ZeRO partition: ``params`` say which), so what runs
        here must be elementwise on what the rank holds, or refuse such a parameter."""
        return directions, gains

    def step_sizes(self, group: dict[str, Any]) -> tuple[float, float]:
        """``(1/sigma_t, 1/rho_t)`` under the schedule factor f_t = lr * sigma: sigma/f_t and rho/f_t."""
        lr = group["lr"]
        return lr, lr * (group["sigma"] / group["rho"])  # exactly lr at rho = sigma

    def end_step(self, duals: list[list[Tensor]], aggregates: list[Tensor], weights: list[float], weight_sum: float,
                 group: dict[str, Any], reduce: Reduce) -> None:
        """Per-sub-batch mode, after the ranks' aggregates are summed and before they are applied: ``duals[i]`` are
        this rank's slots' duals of parameter i, ``weights`` their slots' weights (0: skipped), ``weight_sum`` the
        sum over all ranks. A solve may rescale the duals and add to the aggregates (``reduce`` first, so that every
        rank adds the same)."""


LOCAL_SOLVES: dict[str, LocalSolve] = {}


def register_local_solve(cls: type[LocalSolve]) -> type[LocalSolve]:
    """Class decorator: make ``cls`` available as ``BADM(preconditioner=cls.name)``. Solves that share a setting
    must give it the same default (it is one key of the param groups)."""
    for other in LOCAL_SOLVES.values():
        for key in set(cls.settings) & set(other.settings):
            if other.name != cls.name and cls.settings[key] != other.settings[key]:
                raise ValueError(f"local solve {cls.name!r} gives setting {key!r} the default {cls.settings[key]!r}, "
                                 f"{other.name!r} {other.settings[key]!r}: one group key, one default")
    LOCAL_SOLVES[cls.name] = cls()
    return cls


def setting_defaults() -> dict[str, Any]:
    """Every registered solve's settings with their defaults (the keys BADM puts in each param group)."""
    return {key: value for solve in LOCAL_SOLVES.values() for key, value in solve.settings.items()}


def check_settings(group: dict[str, Any]) -> None:
    """Every registered solve's check of the settings present in ``group``."""
    for solve in LOCAL_SOLVES.values():
        solve.check_settings(group)


def elementwise_solves() -> tuple[str, ...]:
    """The solves offered for the tensors an orthogonalising solve does not take (they give ``elementwise_sigma``)."""
    return tuple(name for name, solve in LOCAL_SOLVES.items() if solve.elementwise_sigma is not None)


def plain_solve() -> str:
    """The paper's local solve."""
    return next(name for name, solve in LOCAL_SOLVES.items() if solve.plain)


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
