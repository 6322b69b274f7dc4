"""BADM (Batch ADMM) as a ``torch.optim.Optimizer``: the math only, no Hugging Face imports."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from hf_badm.optim.defaults import default_rho
from hf_badm.optim.preconditioned import (fold_second_moment, fused_second_moment, newton_schulz_direction,
                                          normalized_direction, normalized_directions, second_moment_gain)

__all__ = ["BADM", "NonFiniteGradientError", "reslot_state_dict"]

MODES = ("fused", "per_sub_batch")
PRECONDITIONERS = ("none", "second_moment", "newton_schulz", "normalized")
NONFINITE = ("skip", "raise")


class NonFiniteGradientError(FloatingPointError, ValueError):
    """Raised by ``nonfinite="raise"`` when a gradient holds NaN or Inf."""


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _all_finite(tensors: list[Tensor]) -> bool:
    """One reduction per device and a single host sync. Off CPU: max|x| (a fused multi-tensor inf-norm)
    is NaN/Inf iff some element is. On CPU that inf-norm is a scalar loop (about 8x a vectorised pass,
    more than the whole update), so there min and max of each tensor, one vectorised pass: NaN propagates
    into both and +-Inf shows in one of them. Empty tensors have no elements to check."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        if t.numel():
            by_device.setdefault(t.device, []).append(t)
    for device, ts in by_device.items():
        if device.type == "cpu":
            extremes = [x for t in ts for x in torch.aminmax(t)]
        else:
            extremes = torch._foreach_norm(ts, math.inf)
        if not bool(torch.stack(extremes).isfinite().all()):
            return False
    return True


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
    ``hf_badm.distributed.all_reduce_aggregator``) sums the aggregates and weights over ranks at
    :meth:`step`: one collective per step; every trainable parameter then joins that reduction (a
    missing gradient is a zero gradient) so that all ranks reduce the same buffers.

    **Re-slotting (elastic resume).** :meth:`state_dict` keeps this rank's slot duals and the weights
    of its last step's slots (``badm.slot_weights``). :func:`reslot_state_dict` turns the states of
    any number of ranks into the state of a rank with any number of slots, each holding the weighted
    mean dual :math:`\bar\pi = \sum_s \alpha_s \pi_s`. The next iterate depends on the slots only
    through :math:`\sum_s \alpha'_s \pi'_s = \bar\pi` (one-buffer form), so this is exact whenever
    the weights are steady (equal-sized sub-batches, uniform weights); with changing weights it is the
    natural approximation (slots of different layouts are not the same sub-batches).

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
            ``second_moment`` (``hf_badm.optim.defaults``, measured).
        lr: alternative spelling of :math:`1/\sigma` (give one of ``sigma`` and ``lr``).
        weight_decay: decoupled weight decay :math:`\lambda \ge 0`.
        mode: ``"fused"`` or ``"per_sub_batch"``.
        foreach: use the ``torch._foreach_*`` kernels (default: on, as torch decides for its optimizers).
        nonfinite: ``"skip"`` (default) leaves parameters and state untouched when a step's gradient
            (or an absorbed sub-batch) holds NaN/Inf, warns and counts it; ``"raise"`` raises
            :class:`NonFiniteGradientError` instead.
        preconditioner: the local solve (``hf_badm.optim.preconditioned``): ``"none"`` (the paper),
            ``"second_moment"`` (SISA-like, ``D = sigma + rho (sqrt(v_hat) + eps)``), ``"normalized"``
            (QHAdam-like: ``g / (sqrt(v_hat) + eps)`` replaces ``g`` in the local solve; Adam-scale ``lr``)
            or ``"newton_schulz"`` (NSISA-like on 2-D tensors, second_moment elsewhere: put embeddings and
            the LM head in a group of their own with an elementwise preconditioner). Per-sub-batch
            mode keeps the preconditioner state per slot (the literal PISA form); fused mode shares one
            from the reduced gradient (exact for second_moment and normalized; an approximation of
            per-slot Newton-Schulz). Extra state per parameter: second_moment and normalized 1 buffer
            (fused) or 1 per slot; newton_schulz 1 momentum buffer (fused) or 1 per slot on matrices.
        beta2, eps: second-moment EMA rate and floor.  ns_momentum, ns_steps: Newton-Schulz momentum
            and iterations.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        sigma: float | None = None,
        rho: float | None = None,
        *,
        lr: float | None = None,
        weight_decay: float = 0.0,
        mode: str = "fused",
        foreach: bool | None = None,
        nonfinite: str = "skip",
        preconditioner: str = "none",
        beta2: float = 0.999,
        eps: float = 1e-8,
        ns_momentum: float = 0.95,
        ns_steps: int = 5,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if foreach is not None and not isinstance(foreach, bool):
            raise ValueError(f"foreach must be True, False or None, got {foreach!r}")
        sigma, lr = _resolve_sigma_lr(sigma, lr, default_sigma=1.0)
        defaults = dict(lr=lr, sigma=sigma, weight_decay=_non_negative("weight_decay", weight_decay),
                        foreach=foreach, preconditioner=preconditioner, beta2=beta2, eps=eps, ns_momentum=ns_momentum,
                        ns_steps=ns_steps)
        _check_preconditioner(defaults)
        defaults["rho"] = default_rho(preconditioner, sigma) if rho is None else _positive("rho", rho)
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
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups and validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        if "sigma" in group or "lr" in group:
            if "sigma" in group and "lr" in group:
                sigma, lr = _positive("sigma", group["sigma"]), _positive("lr", group["lr"])
                if not math.isclose(lr * sigma, 1.0, rel_tol=1e-9):
                    raise ValueError(f"param group gives sigma={sigma} and lr={lr}; lr means 1/sigma: give one")
            else:
                group["sigma"], group["lr"] = _resolve_sigma_lr(group.get("sigma"), group.get("lr"), 1.0)
            # a group that overrides sigma but not rho keeps the optimizer's beta = rho / (rho + sigma)
            group.setdefault("rho", group["sigma"] * self.defaults["rho"] / self.defaults["sigma"])
        if "rho" in group:
            group["rho"] = _positive("rho", group["rho"])
        if "weight_decay" in group:
            group["weight_decay"] = _non_negative("weight_decay", group["weight_decay"])
        _check_preconditioner(group)
        if not (group.get("foreach") is None or isinstance(group["foreach"], bool)):
            raise ValueError(f"foreach must be True, False or None, got {group['foreach']!r}")
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
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

    @staticmethod
    def _coefficients(group: dict[str, Any]) -> tuple[float, float, float]:
        """``(lr_t, beta, 1/rho_t)`` with lr_t = 1/sigma_t = f_t/sigma and 1/rho_t = f_t/rho.

        Written in step sizes, not penalties, so that f_t = 0 (the first warm-up step, the end of a
        linear decay) is the well-defined limit sigma_t, rho_t -> inf: the duals still move (beta is
        fixed), the parameters do not."""
        lr = group["lr"]
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr (1/sigma) must be a finite number >= 0 at every step, got {lr!r}")
        sigma, rho = group["sigma"], group["rho"]
        return lr, rho / (rho + sigma), lr * sigma / rho

    def _foreach(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        if group["foreach"] is not None:
            return group["foreach"]
        return not torch.jit.is_scripting() and all(p.device.type in ("cpu", "cuda", "xpu") for p in params)

    def _params_to_update(self, group: dict[str, Any], key: str) -> list[Tensor]:
        """Params with a gradient, or with history (their state evolves under a zero gradient)."""
        out = []
        for p in group["params"]:
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise ValueError("BADM does not support sparse gradients")
                out.append(p)
            elif key in self.state[p]:
                out.append(p)
        return out

    def _check_finite(self, grads: list[Tensor], what: str) -> bool:
        if _all_finite(grads):
            return True
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(f"BADM: {what} holds NaN or Inf")
        warnings.warn(f"BADM: {what} holds NaN or Inf; skipped, parameters and state unchanged", stacklevel=3)
        return False

    # ------------------------------------------------------------------ fused mode
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
        work = [(g, self._params_to_update(g, "momentum")) for g in self.param_groups]
        grads = [p.grad for _, ps in work for p in ps if p.grad is not None]
        if not self._check_finite(grads, "gradient"):
            self.skipped_steps += 1
            return
        for group, params in work:
            if not params:
                continue
            lr, beta, inv_rho = self._coefficients(group)
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(state["momentum"])
            if group["preconditioner"] != "none":
                self._fused_preconditioned(group, params, bufs, lr, beta, inv_rho)
                continue
            kernel = _fused_foreach if self._foreach(group, params) else _fused_single
            kernel(params, _grads_or_zeros(params), bufs, beta=beta, inv_rho=inv_rho, c=inv_rho - lr,
                   decay=1.0 - group["weight_decay"] * lr)
        self.sub_batches_last_step = 1

    def _fused_preconditioned(self, group: dict[str, Any], params: list[Tensor], bufs: list[Tensor], lr: float,
                              beta: float, inv_rho: float) -> None:
        """One shared preconditioner from the reduced gradient (exact for second_moment, see
        ``preconditioned``); newton_schulz orthogonalises the reduced gradient's momentum."""
        decay = 1.0 - group["weight_decay"] * lr
        normalized: list[tuple[Tensor, Tensor, Tensor]] = []  # updated together below (foreach kernels)
        for p, g, m in zip(params, _grads_or_zeros(params), bufs):
            state = self.state[p]
            kind = _local_solve(group, p)
            if kind == "newton_schulz":
                if "ns_momentum" not in state:
                    state["ns_momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                d = newton_schulz_direction(g, state["ns_momentum"], group["ns_momentum"], group["ns_steps"])
                _fused_single([p], [d], [m], beta=beta, inv_rho=inv_rho, c=inv_rho - lr, decay=decay)
                continue
            if "exp_avg_sq" not in state:
                state["exp_avg_sq"], state["steps"] = torch.zeros_like(p, memory_format=torch.preserve_format), 0
            state["steps"] += 1
            if kind == "normalized":
                normalized.append((p, g, m))
                continue
            fused_second_moment(p, g, m, state["exp_avg_sq"], state["steps"], lr=lr, ratio=group["rho"] / group["sigma"],
                                beta2=group["beta2"], eps=group["eps"], decay=decay)
        if normalized:
            ps, gs, ms = (list(t) for t in zip(*normalized))
            foreach = self._foreach(group, ps)
            ds = normalized_directions(gs, [self.state[p]["exp_avg_sq"] for p in ps], [self.state[p]["steps"] for p in ps],
                                       group["beta2"], group["eps"], foreach)
            kernel = _fused_foreach if foreach else _fused_single
            kernel(ps, ds, ms, beta=beta, inv_rho=inv_rho, c=inv_rho - lr, decay=decay)

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
        _non_negative("weight", weight)
        slot = len(self._step_weights)
        work = [(g, self._params_to_update(g, "aggregate")) for g in self.param_groups]
        grads = [p.grad for _, ps in work for p in ps if p.grad is not None]
        ok = self._check_finite(grads, f"sub-batch {slot}'s gradient")
        if ok:
            for group, params in work:
                if params:
                    self._absorb_group(group, params, slot, weight)
        else:
            self.skipped_sub_batches += 1
        self._step_weights.append(weight if ok else 0.0)
        for _, params in work:
            for p in params:
                p.grad = None
        return ok

    def _absorb_group(self, group: dict[str, Any], params: list[Tensor], slot: int, weight: float) -> None:
        self._coefficients(group)  # validates lr; k = sigma_t / (sigma_t + rho_t) does not depend on f_t
        duals, aggs = [], []
        for p in params:
            state = self._slot_state(p)
            duals.append(_slot_list(state, "duals", slot, p)[slot])
            aggs.append(state["aggregate"])
        if group["preconditioner"] != "none":
            self._absorb_preconditioned(group, params, duals, aggs, slot, weight)
            return
        kernel = _absorb_foreach if self._foreach(group, params) else _absorb_single
        kernel(_grads_or_zeros(params), duals, aggs, k=group["sigma"] / (group["sigma"] + group["rho"]), weight=weight)

    def _absorb_preconditioned(self, group: dict[str, Any], params: list[Tensor], duals: list[Tensor],
                               aggs: list[Tensor], slot: int, weight: float) -> None:
        """The literal PISA local solve: each slot keeps its own preconditioner state."""
        sigma, rho = group["sigma"], group["rho"]
        for p, g, pi, agg in zip(params, _grads_or_zeros(params), duals, aggs):
            state = self.state[p]
            kind = _local_solve(group, p)
            if kind == "newton_schulz":
                moms = _slot_list(state, "slot_ns", slot, p)
                d, k = newton_schulz_direction(g, moms[slot], group["ns_momentum"], group["ns_steps"]), sigma / (sigma + rho)
            else:
                sqs, steps = _slot_list(state, "slot_sq", slot, p), state.setdefault("slot_steps", [])
                steps.extend([0] * (slot + 1 - len(steps)))
                steps[slot] += 1
                if kind == "normalized":
                    d = normalized_direction(g, sqs[slot], steps[slot], group["beta2"], group["eps"])
                    k = sigma / (sigma + rho)
                else:
                    fold_second_moment(sqs[slot], g, group["beta2"])
                    d, k = g, second_moment_gain(sqs[slot], steps[slot], rho / sigma, group["beta2"], group["eps"])
            kt = (d + pi).mul_(k)  # sigma_t (w_s - w) = -(d + pi) / (1 + rho q / sigma)
            pi.sub_(kt)
            agg.add_(pi, alpha=weight).add_(kt, alpha=-weight)

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
        for group, aggs in zip(self.param_groups, aggs_by_group):
            params = [p for p in group["params"] if "aggregate" in self.state[p]]
            if not params:
                continue
            lr, _, _ = self._coefficients(group)
            kernel = _apply_foreach if self._foreach(group, params) else _apply_single
            kernel(params, aggs, scale=lr / weight_sum, decay=1.0 - group["weight_decay"] * lr)

    # ------------------------------------------------------------------ state and metrics
    @property
    def slots(self) -> int:
        """Slots this rank holds (per_sub_batch): the most sub-batches absorbed in one step so far."""
        return max((len(s.get("duals", [])) for s in self.state.values()), default=0)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["badm"] = dict(mode=self.mode, step_weights=list(self._step_weights), slot_weights=list(self.slot_weights),
                          skipped_steps=self.skipped_steps, skipped_sub_batches=self.skipped_sub_batches,
                          sub_batches_last_step=self.sub_batches_last_step)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("badm", None)
        if extra is not None and extra["mode"] != self.mode:
            raise ValueError(f"state was saved in mode={extra['mode']!r} but this optimizer has mode={self.mode!r}")
        super().load_state_dict(state_dict)
        if extra is not None:
            self._step_weights, self.slot_weights = list(extra["step_weights"]), list(extra["slot_weights"])
            self.skipped_steps, self.skipped_sub_batches = extra["skipped_steps"], extra["skipped_sub_batches"]
            self.sub_batches_last_step = extra["sub_batches_last_step"]

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """σ_t, ρ_t (first group), dual norm, sub-batches in the last step and skipped counts, for logging.

        Dual norm: fused, the norm of the aggregated dual ``||sum_s alpha_s pi_s|| = ||m||``;
        per-sub-batch, the root-mean-square over slots of ``||pi_s||``."""
        lr, _, inv_rho = self._coefficients(self.param_groups[0])
        sigma_t, rho_t = (1.0 / lr, 1.0 / inv_rho) if lr > 0 else (math.inf, math.inf)
        # over self.state, not param_groups: ZeRO-3 swaps its partitions into param_groups only during step()
        if self.mode == "fused":
            tensors = [s["momentum"] for s in self.state.values() if "momentum" in s]
        else:
            tensors = [d for s in self.state.values() for d in s.get("duals", [])]
        sq = sum(float(n) ** 2 for n in torch._foreach_norm(tensors)) if tensors else 0.0
        if self.mode == "per_sub_batch" and tensors:
            sq /= self.slots
        return {"badm_sigma": sigma_t, "badm_rho": rho_t, "badm_dual_norm": math.sqrt(sq),
                "badm_sub_batches": float(self.sub_batches_last_step), "badm_skipped_steps": float(self.skipped_steps),
                "badm_skipped_sub_batches": float(self.skipped_sub_batches)}


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
            if "slot_sq" in entry or "slot_ns" in entry:
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


def _check_preconditioner(group: dict[str, Any]) -> None:
    if "preconditioner" in group and group["preconditioner"] not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {group['preconditioner']!r}")
    for name in ("beta2", "ns_momentum"):
        value = group.get(name, 0.5)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if "eps" in group:
        _positive("eps", group["eps"])
    steps = group.get("ns_steps", 1)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"ns_steps must be an integer >= 1, got {steps!r}")


def _local_solve(group: dict[str, Any], p: Tensor) -> str:
    """The group's preconditioner for ``p``: Newton-Schulz acts on whole weight matrices only; every
    other tensor of a newton_schulz group takes second_moment."""
    kind = group["preconditioner"]
    return "second_moment" if kind == "newton_schulz" and p.dim() != 2 else kind


def _slot_list(state: dict[str, Any], key: str, slot: int, p: Tensor) -> list[Tensor]:
    slots = state.setdefault(key, [])
    while len(slots) <= slot:
        slots.append(torch.zeros_like(p, memory_format=torch.preserve_format))
    return slots


def _resolve_sigma_lr(sigma: float | None, lr: float | None, default_sigma: float) -> tuple[float, float]:
    if sigma is not None and lr is not None:
        raise ValueError(f"give sigma or lr (lr means 1/sigma), not both: sigma={sigma!r}, lr={lr!r}")
    if lr is not None:
        lr = _positive("lr", lr)
        return 1.0 / lr, lr
    sigma = default_sigma if sigma is None else _positive("sigma", sigma)
    return sigma, 1.0 / sigma


# ---------------------------------------------------------------------- kernels
def _fused_single(params, grads, bufs, *, beta, inv_rho, c, decay) -> None:
    for p, g, m in zip(params, grads, bufs):
        if decay != 1.0:
            p.mul_(decay)
        m.lerp_(g, 1.0 - beta)
        p.add_(g, alpha=-inv_rho)
        if c != 0.0:
            p.add_(m, alpha=c)


def _fused_foreach(params, grads, bufs, *, beta, inv_rho, c, decay) -> None:
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, bufs])
    for (dp, dg, dm), _ in grouped.values():
        if decay != 1.0:
            torch._foreach_mul_(dp, decay)
        torch._foreach_lerp_(dm, dg, 1.0 - beta)
        torch._foreach_add_(dp, dg, alpha=-inv_rho)
        if c != 0.0:
            torch._foreach_add_(dp, dm, alpha=c)


def _absorb_single(grads, duals, aggs, *, k, weight) -> None:
    # pi' = pi - k (g + pi) (= pi + sigma (w_s - w)); the slot's term sigma (w_s - w) + pi' = pi' - k (g + pi)
    # = 2 pi' - pi, so A += weight (2 pi' - pi): no temporary tensor.
    for g, pi, a in zip(grads, duals, aggs):
        a.add_(pi, alpha=-weight)
        pi.mul_(1.0 - k).add_(g, alpha=-k)
        a.add_(pi, alpha=2.0 * weight)


def _absorb_foreach(grads, duals, aggs, *, k, weight) -> None:
    grouped = Optimizer._group_tensors_by_device_and_dtype([grads, duals, aggs])
    for (dg, dpi, da), _ in grouped.values():
        torch._foreach_add_(da, dpi, alpha=-weight)
        torch._foreach_mul_(dpi, 1.0 - k)
        torch._foreach_add_(dpi, dg, alpha=-k)
        torch._foreach_add_(da, dpi, alpha=2.0 * weight)


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
