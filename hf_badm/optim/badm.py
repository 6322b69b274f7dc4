"""BADM (Batch ADMM) as a ``torch.optim.Optimizer``: the math only, no Hugging Face imports."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from hf_badm.optim import solves  # noqa: F401  (registers the built-in local solves)
from hf_badm.optim.local_solve import LOCAL_SOLVES, LocalSolve, keeps_dual, local_solve_for, setting_defaults
from hf_badm.optim.settings import MODE, NONFINITE, NS_DTYPE, PRECONDITIONER, default_rho
from hf_badm.optim.solves.newton_schulz import (Iterations, Orthogonaliser, local_orthogonaliser,
                                                resolve_ns_dtype)
from hf_badm.optim.state_dict import checked_state_dict
from hf_badm.optim.validation import all_finite, check_hyper_parameters, non_negative, penalty, positive

__all__ = ["BADM", "NonFiniteGradientError", "reslot_state_dict"]

# The settings of the built-in local solves with their defaults: BADM's keyword arguments (those of a solve registered
# later go through ``solve_settings=``).
KEYWORD_SETTINGS: dict[str, Any] = setting_defaults()
class NonFiniteGradientError(FloatingPointError, ValueError):
    """Raised by ``nonfinite="raise"`` when a gradient holds NaN or Inf."""


def _grads_or_zeros(params: list[Tensor]) -> list[Tensor]:
    """``grad is None`` is a zero gradient in the literal algorithm (only reached for params with history)."""
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


class BADM(Optimizer):
    r"""Batch ADMM (Wang, Zhou & Li, arXiv:2407.01640) with exact one-buffer and per-sub-batch forms.

    A batch is split into S sub-batches with weights :math:`\alpha_s` (:math:`\sum_s \alpha_s = 1`);
    each sub-batch owns a local copy :math:`w_s` and a dual :math:`\pi_s`. One step, literally::

        g_s   = grad F_s(w)                              (all at the same global w)
        w_s   = w - (g_s + pi_s) / (sigma + rho)
        pi_s  = pi_s + sigma (w_s - w)
        w     = sum_s alpha_s (w_s + pi_s / sigma)

    Substituting the local updates gives the **one-buffer form** (exact whenever the weights
    :math:`\alpha_s` do not change from step to step; :math:`m = -\sum_s \alpha_s \pi_s`,
    :math:`\bar g = \sum_s \alpha_s g_s`, :math:`\beta = \rho/(\rho+\sigma)`)::

        m = beta m + (1 - beta) g_bar
        w = w - g_bar / rho + (1/rho - 1/sigma) m

    i.e. quasi-hyperbolic momentum with step :math:`1/\sigma`, :math:`\nu = 1 - \sigma/\rho` and
    :math:`\beta = \rho/(\rho+\sigma)`. :math:`\bar g` is what gradient accumulation and data-parallel
    reduction already compute, so ``mode="fused"`` (default) consumes ``p.grad`` and keeps **one**
    buffer per parameter (SGD-momentum-sized, half of AdamW's state).

    ``mode="per_sub_batch"`` keeps the literal slots: call :meth:`absorb_sub_batch` after each
    sub-batch's backward (``p.grad`` = that sub-batch's mean-loss gradient at the current w); it
    updates the next slot's dual and adds the slot's term to a running aggregate; :meth:`step`
    normalises the weights and sets the new w. Memory: one dual per slot plus one aggregate buffer
    per parameter. Use it when weights change per step (token counts) or something non-linear acts
    per sub-batch (per-sub-batch clipping); the parameters never move between absorbs.

    **Data parallelism.** Fused: the framework's gradient reduction (DDP all-reduce, ZeRO/FSDP
    reduce-scatter) computes :math:`\bar g`; the update is elementwise, so it runs unchanged on
    ZeRO's flat partitions and FSDP's sharded parameters. Per-sub-batch: each rank owns the slots of
    its own sub-batches, gradients are never reduced, and :attr:`aggregator` (e.g.
    ``hf_badm.parallel.all_reduce_aggregator``) sums the aggregates and weights over ranks at
    :meth:`step`: one collective per step; every trainable parameter then joins that reduction (a
    missing gradient is a zero gradient) so that all ranks reduce the same buffers.

    **Re-slotting (elastic resume).** :meth:`state_dict` keeps this rank's slot duals and the weights
    of its last step's slots (``badm.slot_weights``). :func:`reslot_state_dict` turns the states of
    any number of ranks into the state of a rank with any number of slots, each holding the weighted
    mean dual :math:`\bar\pi = \sum_s \alpha_s \pi_s`. The next iterate depends on the slots only
    through :math:`\sum_s \alpha'_s \pi'_s = \bar\pi` (one-buffer form), so this is exact whenever
    the weights are steady (equal-sized sub-batches, uniform weights); with changing weights it is the
    natural approximation (slots of different layouts are not the same sub-batches).

    **Newton-Schulz is Muon at rho = sigma.** With ``preconditioner="newton_schulz"`` the direction of
    a weight matrix is Muon's: Nesterov momentum :math:`M \leftarrow \mu M + g` (:math:`\mu` =
    ``ns_momentum`` = 0.95), :math:`d = \mathrm{NS}_5(g + \mu M)\sqrt{\max(1, \mathrm{rows}/\mathrm{cols})}`
    with the quintic coefficients (3.4445, -4.7750, 2.0315). Fused mode then steps
    ``w <- w (1 - weight_decay * lr_t) - d / rho_t + c m`` with :math:`c = 1/\rho_t - 1/\sigma_t`: at
    :math:`\rho = \sigma` (the default) :math:`c = 0` at every step and this **is Muon** with ``lr`` =
    :math:`1/\sigma` and decoupled weight decay on the hidden matrices (the buffer m is then neither
    allocated nor touched, so the state is Muon's). :math:`\rho \ne \sigma` adds BADM's dual as
    quasi-hyperbolic momentum over the orthogonalised directions (:math:`m \leftarrow \beta m + (1-\beta) d`,
    :math:`\nu = 1 - \sigma/\rho`). Per-sub-batch mode orthogonalises each sub-batch's own momentum
    :math:`M_s` and averages the local solutions through the duals (PISA's NSISA).

    **Newton-Schulz seam.** All of a step's orthogonalisation goes through one call of
    :attr:`orthogonaliser` ``(params, inputs, steps, dtype) -> list[Tensor]`` (one call per distinct
    ``(steps, dtype)``, i.e. one in practice): fused :meth:`step` first computes the inputs
    :math:`g + \mu M` of every Newton-Schulz tensor of every group (after updating M), then calls it with
    the parameters they belong to, then lets each solve finish its directions (:meth:`LocalSolve.finish`, on what
    the call returned: this rank's piece on a sharded engine) and applies all updates; :meth:`absorb_sub_batch`
    does the same for its slot. ``steps`` is a count of Muon's quintic iterations or an
    :class:`~hf_badm.optim.solves.newton_schulz.NSSchedule` (pass it on to ``orthogonalise``). Contract: for each input
    X, in order, return the direction of X's shape: for a whole matrix
    :math:`\mathrm{NS}_{steps}(X)\sqrt{\max(1, \mathrm{rows}/\mathrm{cols})}` computed in ``dtype`` and
    cast back to X's dtype, for a 3-D stack of expert matrices the same per slice, for a shard or partition
    of whole matrices (the parameter says which: an FSDP2 DTensor, or a flat partition registered with
    :func:`~hf_badm.parallel.orthogonalise.register_matrix_layout`) this process's share of the whole
    matrices' directions; do not modify the inputs. The default, :func:`local_orthogonaliser`, takes whole
    matrices only; ``hf_badm.parallel`` supplies the one for several ranks and sharded engines. ``dtype`` is
    ``ns_dtype`` resolved on the input's device. In fused mode the inputs are identical on every
    data-parallel rank (they come from the reduced gradient), so ranks may each orthogonalise a share and
    exchange the results; in per-sub-batch mode each rank's inputs are its own slots'.

    **Learning rates and schedules.** ``lr`` is a spelling of :math:`1/\sigma`. A scheduler scales a
    group's ``lr`` by a factor :math:`f_t`; BADM reads it as :math:`\sigma_t = \sigma/f_t` and
    :math:`\rho_t = \rho/f_t` (so :math:`\sigma_t = 1/\mathrm{lr}_t`, :math:`\rho_t = \rho/(\sigma\,\mathrm{lr}_t)`
    and :math:`\beta` stays fixed), as in the authors' code. A factor of 0 (the first warm-up step) is
    the limit :math:`\sigma_t, \rho_t \to \infty`: the duals still move, the parameters do not. ``sigma``/``rho`` in a group are the base
    (f = 1) values. **Weight decay** is decoupled (AdamW semantics): ``w <- w (1 - weight_decay * lr_t)``
    before the update, i.e. :math:`w(1 - \lambda/\sigma_t)`.

    Args:
        params: parameters or param-group dicts; groups may override ``sigma``, ``rho``, ``lr``,
            ``weight_decay`` and ``foreach``.
        sigma: augmented-Lagrangian penalty :math:`\sigma > 0` (step size :math:`1/\sigma`).
            Default 1.0 when neither ``sigma`` nor ``lr`` is given.
        rho: proximal coefficient :math:`\rho > 0`; default :math:`9\sigma` (:math:`\beta = 0.9`) for the
            paper's BADM and ``normalized``, :math:`\sigma` for ``newton_schulz``, :math:`6000\sigma` for
            ``second_moment`` (each solve's measured ``rho_over_sigma``: :func:`hf_badm.optim.settings.default_rho`).
        lr: alternative spelling of :math:`1/\sigma` (give one of ``sigma`` and ``lr``); a 1-element tensor is
            taken as torch's optimizers take it (a scheduler fills it in place) and read at each step.
        weight_decay: decoupled weight decay :math:`\lambda \ge 0`.
        mode: ``"fused"`` or ``"per_sub_batch"``.
        foreach: use the ``torch._foreach_*`` kernels (default: on, as torch decides for its optimizers).
        nonfinite: ``"skip"`` (default) leaves parameters and state untouched when a step's gradient
            (or an absorbed sub-batch) holds NaN/Inf, warns and counts it; ``"raise"`` raises
            :class:`NonFiniteGradientError` instead.
        preconditioner: the local solve (a :class:`~hf_badm.optim.local_solve.LocalSolve`, one file each in
            ``hf_badm.optim.solves``; BADM itself only runs the two modes around it): ``"none"`` (the paper),
            ``"second_moment"`` (SISA-like, ``D = sigma + rho (sqrt(v_hat) + eps)``), ``"normalized"``
            (QHAdam-like: ``g / (sqrt(v_hat) + eps)`` replaces ``g`` in the local solve; Adam-scale ``lr``)
            or ``"newton_schulz"`` (NSISA-like on 2-D tensors, second_moment elsewhere: put embeddings and
            the LM head in a group of their own with an elementwise preconditioner). Per-sub-batch
            mode keeps the preconditioner state per slot (the literal PISA form); fused mode shares one
            from the reduced gradient (exact for second_moment and normalized; an approximation of
            per-slot Newton-Schulz). Extra state per parameter: second_moment and normalized 1 buffer
            (fused) or 1 per slot; newton_schulz 1 momentum buffer (fused) or 1 per slot on matrices.
            Fused mode keeps m only where it acts: not with a scalar-gain solve that has state of its
            own at rho = sigma (c = 0).
        ns_dtype: the dtype Newton-Schulz runs in: ``"auto"`` (bfloat16 on CUDA, as torch.optim.Muon;
            float32 elsewhere), ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"float64"``.
        beta1, beta2, eps, ns_momentum, ns_steps, ns_coefficients, ns_lr_scale, normuon_beta2, dual_scale,
            sigma_schedule, gain_eps: the built-in local solves' settings, for every group that does not set them;
            each solve's file (``hf_badm.optim.solves``) holds its settings' defaults and checks: ``beta1`` (adam),
            ``beta2``, ``eps`` (second_moment, normalized, adam), ``ns_*`` (newton_schulz and its variants),
            ``normuon_beta2`` (normuon), ``dual_scale``, ``sigma_schedule``, ``gain_eps`` (nsisa).
        solve_settings: the settings of local solves registered after hf_badm's own
            (:func:`~hf_badm.optim.local_solve.register_local_solve` with a ``settings`` of their own), by name. A
            new built-in solve's setting becomes a keyword above instead (tests/test_settings.py checks that every
            built-in setting is one, with its solve's default).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        sigma: float | None = None,
        rho: float | None = None,
        *,
        lr: float | Tensor | None = None,
        weight_decay: float = 0.0,
        mode: str = MODE.default,
        foreach: bool | None = None,
        nonfinite: str = NONFINITE.default,
        preconditioner: str = PRECONDITIONER.default,
        ns_dtype: str = NS_DTYPE.default,
        beta1: float = KEYWORD_SETTINGS["beta1"],
        beta2: float = KEYWORD_SETTINGS["beta2"],
        eps: float = KEYWORD_SETTINGS["eps"],
        ns_momentum: float = KEYWORD_SETTINGS["ns_momentum"],
        ns_steps: int = KEYWORD_SETTINGS["ns_steps"],
        ns_coefficients: str = KEYWORD_SETTINGS["ns_coefficients"],
        ns_lr_scale: str = KEYWORD_SETTINGS["ns_lr_scale"],
        normuon_beta2: float = KEYWORD_SETTINGS["normuon_beta2"],
        dual_scale: str = KEYWORD_SETTINGS["dual_scale"],
        sigma_schedule: str = KEYWORD_SETTINGS["sigma_schedule"],
        gain_eps: float = KEYWORD_SETTINGS["gain_eps"],
        solve_settings: Mapping[str, Any] | None = None,
    ) -> None:
        for setting, value in ((MODE, mode), (NONFINITE, nonfinite), (NS_DTYPE, ns_dtype)):
            setting.check(value)
        built_in = dict(beta1=beta1, beta2=beta2, eps=eps, ns_momentum=ns_momentum, ns_steps=ns_steps,
                        ns_coefficients=ns_coefficients, ns_lr_scale=ns_lr_scale, normuon_beta2=normuon_beta2,
                        dual_scale=dual_scale, sigma_schedule=sigma_schedule, gain_eps=gain_eps)
        sigma, lr = _resolve_sigma_lr(sigma, lr, default_sigma=1.0)
        defaults = dict(lr=lr, sigma=sigma, weight_decay=non_negative("weight_decay", weight_decay),
                        foreach=foreach, preconditioner=preconditioner,
                        **_registered_settings(built_in, dict(solve_settings or {})))
        check_hyper_parameters(defaults)
        defaults["rho"] = default_rho(preconditioner, sigma) if rho is None else penalty("rho", rho)
        self.mode = mode
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.skipped_sub_batches = 0
        self.sub_batches_last_step = 0
        self.slot_weights: list[float] = []  # per-sub-batch: the weights of the last step's slots on this rank
        self._step_weights: list[float] = []  # per-sub-batch: the running step's slot weights (0 = skipped)
        # Seam for data parallelism: called at step() with the aggregate buffers and this rank's
        # weight sum; must sum both over ranks (in place for the tensors) and return the global sum.
        self.aggregator: Callable[[list[Tensor], float], float] | None = None
        self.ns_dtype = ns_dtype
        self._dual_roles = WeakIdKeyDictionary()  # parameter -> the local solve whose dual it keeps (metrics)
        # Seam for Newton-Schulz work (see the class docstring): all matrices of a step in one call.
        self.orthogonaliser: Orthogonaliser = local_orthogonaliser
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ copies and pickles
    _SEAMS = ("orthogonaliser", "aggregator")

    def __getstate__(self) -> dict[str, Any]:
        """Every setting and counter (torch's keeps only defaults, state and param_groups), without the hooks (as
        torch) and the seams, which may hold the running processes' groups: unpickled, BADM is one process's."""
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_") and k not in self._SEAMS}
        state["_dual_roles"] = dict(self._dual_roles.items())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling, and torch's ``load_state_dict`` (with state and param_groups only: the rest stays)."""
        super().__setstate__({k: v for k, v in state.items() if k != "_dual_roles"})
        if "_dual_roles" in state:
            self._dual_roles = WeakIdKeyDictionary(state["_dual_roles"])
        self.__dict__.setdefault("orthogonaliser", local_orthogonaliser)
        self.__dict__.setdefault("aggregator", None)

    def __deepcopy__(self, memo: dict[int, Any]) -> BADM:
        """Settings, groups and state copied; the seams shared, so that the copy steps on the same ranks."""
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        clone.orthogonaliser, clone.aggregator = self.orthogonaliser, self.aggregator
        return clone

    # ------------------------------------------------------------------ groups and validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        if "sigma" in group or "lr" in group:
            if "sigma" in group and "lr" in group:
                sigma, lr = penalty("sigma", group["sigma"]), positive("lr", _lr_value(group["lr"]))
                if not math.isclose(lr * sigma, 1.0, rel_tol=1e-9):
                    raise ValueError(f"param group gives sigma={sigma} and lr={lr}; lr means 1/sigma: give one")
            else:
                group["sigma"], group["lr"] = _resolve_sigma_lr(group.get("sigma"), group.get("lr"), 1.0)
            group.setdefault("rho", self._group_rho(group))
        if "rho" in group:
            group["rho"] = penalty("rho", group["rho"])
        if "weight_decay" in group:
            group["weight_decay"] = non_negative("weight_decay", group["weight_decay"])
        check_hyper_parameters(group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            p = p[1] if isinstance(p, tuple) else p  # named parameters: torch keeps the names as "param_names"
            if not isinstance(p, Tensor):
                raise ValueError(f"BADM takes tensors as parameters, got {type(p).__name__}")
            if p.is_complex():
                raise ValueError("BADM does not support complex parameters; view them as real (torch.view_as_real)")
            if not p.is_floating_point():
                raise ValueError(f"BADM needs floating-point parameters, got dtype {p.dtype}")
            if p.is_sparse:
                raise ValueError("BADM does not support sparse parameters")
        group["params"] = params
        super().add_param_group(group)

    def _group_rho(self, group: dict[str, Any]) -> float:
        """rho of a group that sets sigma but not rho: the optimizer's beta = rho / (rho + sigma) for a group of the
        optimizer's own solve, else the default of the group's solve."""
        preconditioner = group.get("preconditioner", self.defaults["preconditioner"])
        if preconditioner == self.defaults["preconditioner"]:
            return group["sigma"] * self.defaults["rho"] / self.defaults["sigma"]
        PRECONDITIONER.check(preconditioner)
        return default_rho(preconditioner, group["sigma"])

    @staticmethod
    def group_orthogonalises(group: dict[str, Any]) -> bool:
        """Whether ``group``'s local solve hands its matrices to :attr:`orthogonaliser`."""
        return LOCAL_SOLVES[group["preconditioner"]].orthogonalises

    @property
    def orthogonalises(self) -> bool:
        """Whether any group's local solve hands its matrices to :attr:`orthogonaliser`."""
        return any(self.group_orthogonalises(g) for g in self.param_groups)

    @staticmethod
    def _coefficients(group: dict[str, Any], solve: LocalSolve) -> tuple[float, float, float]:
        """``(lr_t, beta, 1/rho_t)`` with lr_t = 1/sigma_t and 1/rho_t from ``solve``'s schedule (f_t/sigma and
        f_t/rho unless the solve says otherwise).

        Written in step sizes, not penalties, so that f_t = 0 (the first warm-up step, the end of a
        linear decay) is the well-defined limit sigma_t, rho_t -> inf: the duals still move (beta is
        fixed), the parameters do not."""
        lr = group["lr"]
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr (1/sigma) must be a finite number >= 0 at every step, got {lr!r}")
        sigma, rho = group["sigma"], group["rho"]
        lr_t, inv_rho = solve.step_sizes(group)
        return lr_t, rho / (rho + sigma), inv_rho

    def _foreach(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        if group["foreach"] is not None:
            return group["foreach"]
        return not torch.jit.is_scripting() and all(p.device.type in ("cpu", "cuda", "xpu") for p in params)

    def _params_to_update(self, group: dict[str, Any]) -> list[Tensor]:
        """Params with a gradient, or with history (their state evolves under a zero gradient)."""
        out = []
        for p in group["params"]:
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise ValueError("BADM does not support sparse gradients")
                out.append(p)
            elif self.state.get(p):
                out.append(p)
        return out

    def _check_finite(self, grads: list[Tensor], what: str) -> bool:
        if all_finite(grads):
            return True
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(f"BADM: {what} holds NaN or Inf")
        warnings.warn(f"BADM: {what} holds NaN or Inf; skipped, parameters and state unchanged", stacklevel=3)
        return False

    # ------------------------------------------------------------------ the two modes
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.mode == "fused":
            self._fused_step()
        else:
            self._aggregate_step()
        return loss

    def _fused_step(self) -> None:
        """One shared local-solve state from the reduced gradient (exact for the elementwise solves;
        for newton_schulz, an approximation of the per-slot form): directions of every group first, one
        orthogonaliser call, then the updates."""
        work = [(_scalar_lr(g), self._params_to_update(g)) for g in self.param_groups]
        grads = [p.grad for _, ps in work for p in ps if p.grad is not None]
        if not self._check_finite(grads, "gradient"):
            self.skipped_steps += 1
            return
        parts = []
        for group, params in work:
            for solve, ps in _by_solve(group, params):
                self._coefficients(group, solve)  # validates lr before any state moves
                parts.append(_Part.of(group, solve, ps, [self._solve_state(solve, p) for p in ps], self._foreach(group, ps)))
        self._orthogonalise(parts)
        for part in parts:
            group, ps = part.group, part.params
            lr, beta, inv_rho = self._coefficients(group, part.solve)
            decay = 1.0 - group["weight_decay"] * lr
            bufs = [self._dual_buffer(p, part.solve.name) for p in ps] if keeps_dual(group, part.solve) else None
            # the solve reads pi_bar = -m (zero where fused mode keeps no dual)
            duals = None
            if part.solve.reads_dual:
                duals = torch._foreach_neg(bufs) if bufs is not None else [torch.zeros_like(p) for p in ps]
            part = part.finished([self.state[p] for p in ps], duals)
            if part.gains is not None:
                kernel = _fused_gain_foreach if part.foreach else _fused_gain_single
                kernel(ps, part.directions, bufs, part.gains, lr=lr, decay=decay)
            else:
                kernel = _fused_foreach if part.foreach else _fused_single
                kernel(ps, part.directions, bufs, beta=beta, inv_rho=inv_rho, c=inv_rho - lr, decay=decay)
        self.sub_batches_last_step = 1

    def _solve_state(self, solve: LocalSolve, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if any(k not in state for k in solve.state_keys):
            state.update(solve.new_state(p))
        return state

    def _dual_buffer(self, p: Tensor, solve: str) -> Tensor:
        state = self.state[p]
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if p not in self._dual_roles:  # which solve's dual this is, for metrics() (after a resume: set here again)
            self._dual_roles[p] = solve
        return state["momentum"]

    def _orthogonalise(self, parts: list[_Part]) -> None:
        """Replace the Newton-Schulz inputs of ``parts`` by their directions: one orthogonaliser call per
        (steps, dtype) of the step (one in practice), with the parameters the inputs belong to."""
        calls: dict[tuple[int, torch.dtype], list[tuple[_Part, int]]] = {}
        for part in parts:
            if part.solve.orthogonalises:
                for i, x in enumerate(part.directions):
                    key = (part.solve.iterations(part.group), resolve_ns_dtype(self.ns_dtype, x.device))
                    calls.setdefault(key, []).append((part, i))
        for key, where in calls.items():  # key: (steps, dtype)
            params = [part.params[i] for part, i in where]
            inputs = [part.directions[i] for part, i in where]
            outputs = self.orthogonaliser(params, inputs, *key)
            if len(outputs) != len(inputs):
                raise RuntimeError(f"BADM.orthogonaliser returned {len(outputs)} directions for {len(inputs)} inputs")
            for (part, i), out in zip(where, outputs):
                part.directions[i] = out

    # ------------------------------------------------------------------ per-sub-batch mode
    @torch.no_grad()
    def absorb_sub_batch(self, weight: float | Tensor = 1.0) -> bool:
        """Take ``p.grad`` as the next sub-batch's mean-loss gradient (at the current parameters),
        update that slot's dual, add ``weight * (sigma w_s + pi_s)`` to the running aggregate and clear
        ``p.grad``. ``weight`` is the sub-batch's unnormalised weight (its loss items, or 1).
        Returns False when the sub-batch was skipped for NaN/Inf (its slot stays untouched)."""
        if self.mode != "per_sub_batch":
            raise RuntimeError('absorb_sub_batch() needs mode="per_sub_batch"; fused mode consumes p.grad in step()')
        weight = float(weight.item() if isinstance(weight, Tensor) else weight)
        non_negative("weight", weight)
        slot = len(self._step_weights)
        work = [(_scalar_lr(g), self._params_to_update(g)) for g in self.param_groups]
        grads = [p.grad for _, ps in work for p in ps if p.grad is not None]
        ok = self._check_finite(grads, f"sub-batch {slot}'s gradient")
        if ok:
            self._absorb(work, slot, weight)
        else:
            self.skipped_sub_batches += 1
        self._step_weights.append(weight if ok else 0.0)
        for _, params in work:
            for p in params:
                p.grad = None
        return ok

    def _absorb(self, work: list[tuple[dict[str, Any], list[Tensor]]], slot: int, weight: float) -> None:
        """The literal local solve of one slot (each slot keeps its own solve state): directions of every
        group first, one orthogonaliser call, then the duals and the aggregate."""
        parts, slot_views = [], []
        for group, params in work:
            for solve, ps in _by_solve(group, params):
                self._coefficients(group, solve)  # validates lr
                views = [self._slot_view(solve, p, slot) for p in ps]
                parts.append(_Part.of(group, solve, ps, views, self._foreach(group, ps)))
                slot_views.append(views)
                self._store_slot(ps, views, slot)
        self._orthogonalise(parts)
        for part, views in zip(parts, slot_views):
            duals = [self.state[p]["duals"][slot] for p in part.params]
            aggs = [self.state[p]["aggregate"] for p in part.params]
            part = part.finished(views, duals if part.solve.reads_dual else None)
            self._store_slot(part.params, views, slot)
            if part.gains is not None:
                kernel = _absorb_gain_foreach if part.foreach else _absorb_gain_single
                kernel(part.directions, duals, aggs, part.gains, weight=weight)
            else:
                kernel = _absorb_foreach if part.foreach else _absorb_single
                sigma, rho = part.group["sigma"], part.group["rho"]
                kernel(part.directions, duals, aggs, k=sigma / (sigma + rho), weight=weight)

    def _store_slot(self, params: list[Tensor], views: list[dict[str, Any]], slot: int) -> None:
        """Write back what a solve rebound in its slot views (its step counts)."""
        for p, view in zip(params, views):
            for key, value in view.items():
                self.state[p][key][slot] = value

    def _slot_view(self, solve: LocalSolve, p: Tensor, slot: int) -> dict[str, Any]:
        """Slot ``slot``'s solve state of ``p`` (created up to that slot), as the solve's own keys."""
        state = self._slot_state(p)
        duals = state["duals"]
        if p not in self._dual_roles:
            self._dual_roles[p] = solve.name
        while len(duals) <= slot:
            duals.append(torch.zeros_like(p, memory_format=torch.preserve_format))
        if solve.state_keys:
            while len(state.setdefault(solve.state_keys[0], [])) <= slot:
                for key, value in solve.new_state(p).items():
                    state.setdefault(key, []).append(value)
        return {key: state[key][slot] for key in solve.state_keys}

    def _slot_state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "aggregate" not in state:
            state["aggregate"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["duals"] = []
        return state

    def _aggregate_step(self) -> None:
        if not self._step_weights:
            if any(p.grad is not None for g in self.param_groups for p in g["params"]):
                raise RuntimeError(
                    'BADM(mode="per_sub_batch"): step() was called with gradients but no absorb_sub_batch(); '
                    "call absorb_sub_batch(weight) after each sub-batch's backward (BADMTrainer does this), "
                    'or use mode="fused" where gradients are accumulated/reduced before the step'
                )
            return
        if self.aggregator is not None:  # every rank must reduce the same list of buffers
            for group in self.param_groups:
                for p in group["params"]:
                    if p.requires_grad:
                        self._slot_state(p)
        aggs_by_group = [[self.state[p]["aggregate"] for p in g["params"] if "aggregate" in self.state[p]]
                         for g in self.param_groups]
        weight_sum = sum(self._step_weights)
        if self.aggregator is not None:
            weight_sum = self.aggregator([a for aggs in aggs_by_group for a in aggs], weight_sum)
        self.sub_batches_last_step = len(self._step_weights)
        self.slot_weights, self._step_weights = self._step_weights, []
        if weight_sum <= 0:
            for aggs in aggs_by_group:
                for a in aggs:
                    a.zero_()
            if self.skipped_sub_batches == 0 or weight_sum < 0:
                raise ValueError(f"BADM: the sub-batch weights of a step must sum to > 0, got {weight_sum}")
            self.skipped_steps += 1  # every sub-batch of this step was non-finite
            return
        reduce = self._reduce
        for group in map(_scalar_lr, self.param_groups):
            for solve, params in _by_solve(group, [p for p in group["params"] if "aggregate" in self.state[p]]):
                aggs = [self.state[p]["aggregate"] for p in params]
                solve.end_step([self.state[p]["duals"] for p in params], aggs, self.slot_weights, weight_sum, group,
                               reduce)
                lr, _, _ = self._coefficients(group, solve)
                kernel = _apply_foreach if self._foreach(group, params) else _apply_single
                kernel(params, aggs, scale=lr / weight_sum, decay=1.0 - group["weight_decay"] * lr)

    def _reduce(self, tensors: list[Tensor]) -> None:
        """Sum ``tensors`` over the ranks in place (nothing to do on one process): for a solve's end_step."""
        if self.aggregator is not None:
            self.aggregator(tensors, 0.0)

    # ------------------------------------------------------------------ state and metrics
    @property
    def slots(self) -> int:
        """Slots this rank holds (per_sub_batch): the most sub-batches absorbed in one step so far."""
        return max((len(s.get("duals", [])) for s in self.state.values()), default=0)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["badm"] = self.badm_entry()
        return sd

    def badm_entry(self) -> dict[str, Any]:
        """What the state dict keeps beyond torch's (its ``badm`` entry): the mode, slot weights and counters."""
        return dict(mode=self.mode, step_weights=list(self._step_weights), slot_weights=list(self.slot_weights),
                    skipped_steps=self.skipped_steps, skipped_sub_batches=self.skipped_sub_batches,
                    sub_batches_last_step=self.sub_batches_last_step)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` (this release's or an earlier one's keys). Everything is
        checked first (mode, the groups' settings, every state tensor's shape, dtype and finiteness, the
        per-slot structure and the ``badm`` entry): a state that does not fit raises ValueError naming what,
        and leaves the optimizer unchanged. A group key added since the state was saved (``foreach``, a local
        solve's setting) takes this optimizer's value for it, as torch's optimizers default new flags."""
        state_dict = checked_state_dict(state_dict, self.mode, self.param_groups)
        extra = state_dict.pop("badm", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.load_badm_entry(extra)

    def load_badm_entry(self, extra: dict[str, Any]) -> None:
        """Take a :meth:`badm_entry` (checked by the caller)."""
        self._step_weights, self.slot_weights = list(extra["step_weights"]), list(extra["slot_weights"])
        self.skipped_steps, self.skipped_sub_batches = extra["skipped_steps"], extra["skipped_sub_batches"]
        self.sub_batches_last_step = extra["sub_batches_last_step"]

    def main_group(self) -> dict[str, Any]:
        """The first param group of the optimizer's own local solve (``preconditioner=``): whose step size and beta the
        plain ``badm_*`` metrics report (the groups' order, and under ZeRO-3 their contents, are not a role)."""
        main = self.defaults["preconditioner"]
        return next((g for g in self.param_groups if g["preconditioner"] == main), self.param_groups[0])

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """Per local solve, its step size 1/σ_t and, where it keeps BADM's dual, β = ρ/(ρ+σ) and the dual norm;
        sub-batches in the last step and skipped counts. The optimizer's own solve (``preconditioner=``) reports
        under plain names (``badm_beta``), every other solve of a mixed run with its name (``badm_beta/normalized``).
        Step sizes rather than σ_t, ρ_t: they stay finite where the schedule factor is 0 (the first warm-up step),
        and σ_t = 1/badm_step_size, ρ_t = σ_t β/(1-β).

        Dual norm: fused, the norm of the aggregated dual ``||sum_s alpha_s pi_s|| = ||m||``;
        per-sub-batch, the root-mean-square over slots of ``||pi_s||``. A solve that keeps no dual (newton_schulz
        at rho = sigma: Muon) logs neither β nor a dual norm."""
        main = self.defaults["preconditioner"]
        out: dict[str, float] = {}
        groups = {g["preconditioner"]: _scalar_lr(g) for g in reversed(self.param_groups)}  # the first group of each solve
        # over self.state, not param_groups: ZeRO-3 swaps its partitions into param_groups only during step()
        key = "momentum" if self.mode == "fused" else "duals"
        duals: dict[str, list[Tensor]] = {}
        for p, state in self.state.items():
            if key in state:
                found = state[key] if isinstance(state[key], list) else [state[key]]
                duals.setdefault(self._dual_roles.get(p, main), []).extend(found)
        for name, group in sorted(groups.items(), key=lambda item: item[0] != main):
            suffix = "" if name == main else f"/{name}"
            lr, beta, _ = self._coefficients(group, LOCAL_SOLVES[name])
            out[f"badm_step_size{suffix}"] = lr
            if name in duals or (self.mode != "fused" or keeps_dual(group, LOCAL_SOLVES[name])):
                tensors = duals.get(name, [])
                sq = sum(float(n) ** 2 for n in torch._foreach_norm(tensors)) if tensors else 0.0
                if self.mode == "per_sub_batch" and tensors:
                    sq /= self.slots
                out[f"badm_beta{suffix}"], out[f"badm_dual_norm{suffix}"] = beta, math.sqrt(sq)
        out.update(badm_sub_batches=float(self.sub_batches_last_step), badm_skipped_steps=float(self.skipped_steps),
                   badm_skipped_sub_batches=float(self.skipped_sub_batches))
        return out


@torch.no_grad()
def reslot_state_dict(states: list[dict[str, Any]], slots: int) -> dict[str, Any]:
    """Per-sub-batch state for a rank with ``slots`` slots, from the step-boundary states of the ranks
    of a checkpoint (any number): every slot gets the weighted mean dual over all saved slots,
    ``sum_s w_s pi_s / sum_s w_s`` with each rank's ``slot_weights``. Exact for steady weights (see the
    class docstring); the global parameters are not part of the state."""
    if not states or slots < 1:
        raise ValueError(f"re-slotting needs at least one saved state and slots >= 1, got {len(states)}, {slots}")
    for sd in states:
        extra = sd.get("badm", {})
        if extra.get("mode") != "per_sub_batch" or extra.get("step_weights"):
            raise ValueError("re-slotting takes per_sub_batch optimizer states saved between steps")
    total = sum(sum(sd["badm"]["slot_weights"]) for sd in states)
    if not total > 0:
        raise ValueError(f"the saved slot weights must sum to > 0 to re-slot, got {total}")
    means: dict[Any, Tensor] = {}  # accumulated in float64, cast back per parameter
    like: dict[Any, Tensor] = {}
    for sd in states:
        for key, entry in sd["state"].items():
            if set(entry) - {"duals", "aggregate"}:
                raise ValueError("per-slot preconditioner state is non-linear in the slots and cannot be re-slotted "
                                 "exactly: resume with the same world size and accumulation, or use fused mode")
            like[key] = entry["aggregate"]
            mean = means.setdefault(key, torch.zeros_like(entry["aggregate"], dtype=torch.float64))
            for w, pi in zip(sd["badm"]["slot_weights"], entry["duals"]):  # slots past the last step's weigh 0
                mean.add_(pi, alpha=w / total)
    out = {key: {"aggregate": torch.zeros_like(like[key]),
                 "duals": [mean.to(like[key].dtype, copy=True) for _ in range(slots)]} for key, mean in means.items()}
    # the new slots are all equal, so any positive weights give them the same mean again
    extra = dict(states[0]["badm"], slot_weights=[1.0] * slots, sub_batches_last_step=slots,
                 skipped_steps=max(sd["badm"]["skipped_steps"] for sd in states),
                 skipped_sub_batches=sum(sd["badm"]["skipped_sub_batches"] for sd in states))
    return {"state": out, "param_groups": states[0]["param_groups"], "badm": extra}


def _by_solve(group: dict[str, Any], params: list[Tensor]) -> list[tuple[LocalSolve, list[Tensor]]]:
    """``params`` split by their local solve (the group's, or its fallback), in order of first appearance. A
    ``strict`` group takes no fallback: a tensor its solve cannot act on is an error, not a silent other solve."""
    out: dict[str, tuple[LocalSolve, list[Tensor]]] = {}
    for p in params:
        solve = local_solve_for(group, p)
        if group.get("strict") and not solve.applies(p):
            raise ValueError(f"BADM: a param group asks {group['preconditioner']!r} for every tensor, but one of shape "
                             f"{tuple(p.shape)} is not a whole matrix it can act on (a ZeRO partition whose matrix "
                             "layout was never attached?): create BADM through BADMTrainer, the mixin or "
                             "hf_badm.parallel.prepare_for_ranks/attach_zero_layouts")
        out.setdefault(solve.name, (solve, []))[1].append(p)
    return list(out.values())


class _Part(NamedTuple):
    """The parameters of one group that share one local solve, with this step's directions and gains."""

    group: dict[str, Any]
    solve: LocalSolve
    params: list[Tensor]
    foreach: bool
    directions: list[Tensor]
    gains: list[Tensor] | None

    @classmethod
    def of(cls, group: dict[str, Any], solve: LocalSolve, params: list[Tensor], states: list[dict[str, Any]],
           foreach: bool) -> _Part:
        """Run ``solve`` on the params' gradients (a missing one is zero) with their ``states``."""
        directions, gains = solve.directions(_grads_or_zeros(params), states, group, foreach)
        return cls(group, solve, params, foreach, list(directions), None if gains is None else list(gains))

    def finished(self, states: list[dict[str, Any]], duals: list[Tensor] | None) -> _Part:
        """This part with the directions and gains its solve gives after orthogonalisation (:meth:`LocalSolve.finish`)."""
        directions, gains = self.solve.finish(self.params, self.directions, self.gains, duals, states, self.group,
                                              self.foreach)
        return self._replace(directions=list(directions), gains=None if gains is None else list(gains))


def _registered_settings(built_in: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """Every registered solve's settings for BADM's defaults: the built-in solves' from BADM's keywords, those of solves
    registered after BADM was defined from ``later`` (``solve_settings=``), the rest at their defaults. A name that
    is no setting, or a built-in one given in ``later``, is a TypeError that lists where each setting goes."""
    known = setting_defaults()
    unknown = sorted(set(later) - set(known))
    misplaced = sorted(set(later) & set(KEYWORD_SETTINGS))
    if unknown or misplaced:
        raise TypeError(f"BADM got solve_settings {unknown or misplaced} that "
                        f"{'no registered local solve has' if unknown else 'are BADM keywords'}: give "
                        f"{sorted(KEYWORD_SETTINGS)} as BADM(name=value), and the settings of solves registered later "
                        f"({sorted(set(known) - set(KEYWORD_SETTINGS))}) in solve_settings={{name: value}}")
    return {**known, **built_in, **later}


def _resolve_sigma_lr(sigma: float | None, lr: float | Tensor | None,
                      default_sigma: float) -> tuple[float, float | Tensor]:
    """``(sigma, lr)`` from one of them; a tensor lr stays the group's tensor (a scheduler fills it in place)."""
    if sigma is not None and lr is not None:
        raise ValueError(f"give sigma or lr (lr means 1/sigma), not both: sigma={sigma!r}, lr={lr!r}")
    if lr is not None:
        value = positive("lr", _lr_value(lr))
        return penalty("sigma = 1/lr", 1.0 / value), lr if isinstance(lr, Tensor) else value
    sigma = default_sigma if sigma is None else penalty("sigma", sigma)
    return sigma, 1.0 / sigma


def _lr_value(lr: Any) -> Any:
    """A tensor lr as its number, as torch's optimizers take one (1 element); anything else as it is."""
    if not isinstance(lr, Tensor):
        return lr
    if lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    return lr.item()


def _scalar_lr(group: dict[str, Any]) -> dict[str, Any]:
    """``group`` as the local solves read it: a tensor lr (what a scheduler last filled in) as its number."""
    return {**group, "lr": _lr_value(group["lr"])} if isinstance(group["lr"], Tensor) else group


# ---------------------------------------------------------------------- kernels
def _fused_single(params, directions, bufs, *, beta, inv_rho, c, decay) -> None:
    """m <- beta m + (1 - beta) d;  w <- w - d / rho_t + c m  (m is None where c = 0: see keeps_dual)."""
    for i, (p, d) in enumerate(zip(params, directions)):
        if decay != 1.0:
            p.mul_(decay)
        if bufs is not None:
            bufs[i].lerp_(d, 1.0 - beta)
        p.add_(d, alpha=-inv_rho)
        if c != 0.0:
            p.add_(bufs[i], alpha=c)


def _fused_foreach(params, directions, bufs, *, beta, inv_rho, c, decay) -> None:
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, directions] + ([bufs] if bufs is not None else []))
    for tensors, _ in grouped.values():
        dp, dd = tensors[0], tensors[1]
        if decay != 1.0:
            torch._foreach_mul_(dp, decay)
        if bufs is not None:
            torch._foreach_lerp_(tensors[2], dd, 1.0 - beta)
        torch._foreach_add_(dp, dd, alpha=-inv_rho)
        if c != 0.0:
            torch._foreach_add_(dp, tensors[2], alpha=c)


def _fused_gain_single(params, directions, bufs, gains, *, lr, decay) -> None:
    """The exact shared-gain form, m = -pi: u = k (d + pi);  w <- w - 2 lr u + lr pi;  pi <- pi - u.
    ``gains`` is overwritten with u."""
    for p, d, m, u in zip(params, directions, bufs, gains):
        u.mul_(d - m)
        if decay != 1.0:
            p.mul_(decay)
        p.add_(u, alpha=-2.0 * lr).add_(m, alpha=-lr)
        m.add_(u)


def _fused_gain_foreach(params, directions, bufs, gains, *, lr, decay) -> None:
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, directions, bufs, gains])
    for (dp, dd, dm, du), _ in grouped.values():
        torch._foreach_mul_(du, torch._foreach_sub(dd, dm))
        if decay != 1.0:
            torch._foreach_mul_(dp, decay)
        torch._foreach_add_(dp, du, alpha=-2.0 * lr)
        torch._foreach_add_(dp, dm, alpha=-lr)
        torch._foreach_add_(dm, du)


def _absorb_single(directions, duals, aggs, *, k, weight) -> None:
    # pi' = pi - k (d + pi) (= pi + sigma (w_s - w)); the slot's term sigma (w_s - w) + pi' = pi' - k (d + pi)
    # = 2 pi' - pi, so A += weight (2 pi' - pi): no temporary tensor.
    for d, pi, a in zip(directions, duals, aggs):
        a.add_(pi, alpha=-weight)
        pi.mul_(1.0 - k).add_(d, alpha=-k)
        a.add_(pi, alpha=2.0 * weight)


def _absorb_foreach(directions, duals, aggs, *, k, weight) -> None:
    grouped = Optimizer._group_tensors_by_device_and_dtype([directions, duals, aggs])
    for (dd, dpi, da), _ in grouped.values():
        torch._foreach_add_(da, dpi, alpha=-weight)
        torch._foreach_mul_(dpi, 1.0 - k)
        torch._foreach_add_(dpi, dd, alpha=-k)
        torch._foreach_add_(da, dpi, alpha=2.0 * weight)


def _absorb_gain_single(directions, duals, aggs, gains, *, weight) -> None:
    """Elementwise gains: kt = k (d + pi) = -sigma_t (w_s - w);  pi <- pi - kt;  A += weight (pi - kt)."""
    for d, pi, a, k in zip(directions, duals, aggs, gains):
        kt = k.mul_(d + pi)
        pi.sub_(kt)
        a.add_(pi, alpha=weight).add_(kt, alpha=-weight)


def _absorb_gain_foreach(directions, duals, aggs, gains, *, weight) -> None:
    grouped = Optimizer._group_tensors_by_device_and_dtype([directions, duals, aggs, gains])
    for (dd, dpi, da, dk), _ in grouped.values():
        torch._foreach_mul_(dk, torch._foreach_add(dd, dpi))
        torch._foreach_sub_(dpi, dk)
        torch._foreach_add_(da, dpi, alpha=weight)
        torch._foreach_add_(da, dk, alpha=-weight)


def _apply_single(params, aggs, *, scale, decay) -> None:
    for p, a in zip(params, aggs):
        if decay != 1.0:
            p.mul_(decay)
        p.add_(a, alpha=scale)
        a.zero_()


def _apply_foreach(params, aggs, *, scale, decay) -> None:
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, aggs])
    for (dp, da), _ in grouped.values():
        if decay != 1.0:
            torch._foreach_mul_(dp, decay)
        torch._foreach_add_(dp, da, alpha=scale)
        torch._foreach_zero_(da)
