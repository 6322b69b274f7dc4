r"""``preconditioner="nsisa"``: the authors' NSISA exactly (PISA, arXiv:2502.10784; their GPT-2 script's
``DistributedOptimizer``). Per slot s with weight alpha_s, on weight matrices::

    M_s <- mu M_s + g_s;   d_s = NS5(g_s + mu M_s) sqrt(max(1, rows/cols))          (newton_schulz's direction)
    c_s = d_s + pi_s;      D_s = sigma_t + rho_t (|c_s| + gain_eps)                  (elementwise, after NS)
    w_s = w - c_s / D_s;   pi_s <- gamma_s (pi_s + sigma_t (w_s - w))
    w <- sum_s (alpha_s sigma_t w_s + pi_s) / sigma_t

``dual_scale="weight"``: gamma_s = alpha_s (the authors' code, which shrinks every dual by its slot's weight each
step); ``"one"``: gamma_s = 1 (the paper's algorithm). ``sigma_schedule="linear"``: sigma_t = sigma/f_t,
rho_t = rho/f_t; ``"squared"`` (the authors' warm-down): sigma_t = sigma/f_t**2, rho_t = rho/f_t.

In BADM's terms it is the elementwise-gain solve k_s = sigma_t / D_s = 1 / (1 + (rho_t/sigma_t)(|c_s| + eps)) on
newton_schulz's direction, computed after orthogonalisation from the slot's dual, with the duals rescaled at the end
of the step. With u_s = pi_s - k_s c_s the step is w+ = w - (1/sigma_t) sum_s [(alpha_s + gamma_s) k_s c_s -
gamma_s pi_s], i.e. for gamma = alpha, w+ = w - (1/sigma_t) sum_s alpha_s [2 k_s d_s + (2 k_s - 1) pi_s]. BADM's
aggregate gives sum_s alpha_s (u_s - k_s c_s); :meth:`NSISA.end_step` adds sum_s (gamma_s - alpha_s) u_s (nothing
for gamma = alpha) and sets pi_s = gamma_s u_s. Fused mode is the one-slot case (alpha = gamma = 1) on the reduced
gradient: BADM's exact elementwise-gain form with that gain.

On sharded engines the gain is elementwise on what the rank holds; ``ns_lr_scale="match_rms_adamw"`` needs whole
matrices (refused on ZeRO's flat partitions).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hf_badm.optim.local_solve import Reduce, register_local_solve
from hf_badm.optim.moments import gains_of_
from hf_badm.optim.solves.newton_schulz import NewtonSchulz
from hf_badm.optim.validation import one_of, positive

DUAL_SCALES = ("weight", "one")
SIGMA_SCHEDULES = ("linear", "squared")


@register_local_solve
class NSISA(NewtonSchulz):
    name = "nsisa"
    gains = True
    reads_dual = True
    settings = {**NewtonSchulz.settings, "dual_scale": "weight", "sigma_schedule": "linear", "gain_eps": 1e-8}
    rho_over_sigma = 1.25  # the authors' sigma_0 = 80, rho_0 = 100

    @classmethod
    def check_settings(cls, group: dict[str, Any]) -> None:
        super().check_settings(group)
        if "dual_scale" in group:
            one_of("dual_scale", group["dual_scale"], DUAL_SCALES)
        if "sigma_schedule" in group:
            one_of("sigma_schedule", group["sigma_schedule"], SIGMA_SCHEDULES)
        if "gain_eps" in group:
            positive("gain_eps", group["gain_eps"])

    def step_sizes(self, group: dict[str, Any]) -> tuple[float, float]:
        if group["sigma_schedule"] == "linear":
            return super().step_sizes(group)
        f = group["lr"] * group["sigma"]
        return f * f / group["sigma"], f / group["rho"]

    @staticmethod
    def _ratio(group: dict[str, Any]) -> float:
        """rho_t / sigma_t: rho/sigma, or rho f_t / sigma under the warm-down."""
        ratio = group["rho"] / group["sigma"]
        return ratio if group["sigma_schedule"] == "linear" else ratio * group["lr"] * group["sigma"]

    def finish(self, params: list[Tensor], directions: list[Tensor], gains: list[Tensor] | None,
               duals: list[Tensor] | None, states: list[dict[str, Any]], group: dict[str, Any],
               foreach: bool) -> tuple[list[Tensor], list[Tensor]]:
        """k = 1 / (1 + (rho_t/sigma_t)(|d + pi| + eps)) from the orthogonalised direction and the slot's dual."""
        directions, _ = super().finish(params, directions, gains, duals, states, group, foreach)
        ratio, eps = self._ratio(group), group["gain_eps"]
        if not foreach:
            return directions, [(d + pi).abs_().add_(eps).mul_(ratio).add_(1.0).reciprocal_()
                                for d, pi in zip(directions, duals)]
        k = torch._foreach_add(directions, duals)
        torch._foreach_abs_(k)
        torch._foreach_add_(k, eps)
        return directions, gains_of_(k, ratio)

    def end_step(self, duals: list[list[Tensor]], aggregates: list[Tensor], weights: list[float], weight_sum: float,
                 group: dict[str, Any], reduce: Reduce) -> None:
        """pi_s <- gamma_s u_s, and the aggregate gains weight_sum sum_s (gamma_s - alpha_s) u_s (over every rank's
        slots: one more collective, for gamma = 1 only). A slot of weight 0 (skipped) keeps its dual."""
        one = group["dual_scale"] == "one"
        if one:
            extra = [sum(((weight_sum - w) * u for w, u in zip(weights, slots) if w > 0), torch.zeros_like(a))
                     for slots, a in zip(duals, aggregates)]
            reduce(extra)
            torch._foreach_add_(aggregates, extra)
            return
        for slots in duals:
            for w, u in zip(weights, slots):
                if w > 0:
                    u.mul_(w / weight_sum)
