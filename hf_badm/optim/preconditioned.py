"""Preconditioned local solves for BADM (the authors' PISA direction; ../shared/BADM.md §6).

Plain BADM solves each sub-batch's proximal problem with one gradient step of size 1/(sigma + rho).
The variants here change that local solve and nothing else (the dual update and the aggregation
stay BADM's):

``second_moment`` (SISA-like): the local solve is
``w_s = w - (g_s + pi_s) / (sigma + rho * q_s)`` with ``q_s = sqrt(v_hat_s) + eps`` and ``v_s`` a
bias-corrected EMA of ``g_s**2``. With the preconditioner fixed within a step the update is linear
in (g, pi), so the fused form with ONE shared ``v`` (from the reduced gradient) is itself an exact
algorithm::

    u  = (g + pi) / (sigma + rho q)          # all sub-batches share q
    w <- w - 2 u + pi / sigma
    pi <- pi - sigma u

``newton_schulz`` (NSISA-like): on 2-D weight matrices the local direction is Newton-Schulz
orthogonalised Nesterov momentum, ``M <- mu M + g; d = NS5(g + mu M) * max(1, rows/cols)**0.5``,
used in place of the gradient in plain BADM's local solve; other parameters use ``second_moment``.

``normalized`` (QHAdam-like): the local direction is the gradient divided elementwise by its RMS,
``d_s = g_s / (sqrt(v_hat_s) + eps)``, used in place of the gradient in plain BADM's local solve
(D = sigma + rho), so the duals average normalised directions and the ``pi / sigma`` term is on
Adam's scale. With ``v`` fixed within a step ``d`` is linear in ``g``: the fused form with one shared
``v`` is again an exact algorithm (plain BADM on ``d``).

All functions below are written in step sizes: ``lr`` = 1/sigma_t and ``ratio`` = rho/sigma (fixed
under a schedule), so a zero schedule factor is the sigma, rho -> inf limit (duals move, w does not).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["fold_second_moment", "rms_denominator", "second_moment_gain", "orthogonalised", "fused_second_moment", "newton_schulz_direction",
           "normalized_direction", "normalized_directions"]

# Quintic Newton-Schulz coefficients that drive all singular values towards ~1 in five steps.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def fold_second_moment(v: Tensor, grad: Tensor, beta2: float) -> None:
    """``v <- beta2 v + (1 - beta2) grad**2`` in place: the EMA every elementwise local solve keeps."""
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def rms_denominator(v: Tensor, steps: int, beta2: float, eps: float) -> Tensor:
    """``q = sqrt(v / (1 - beta2**steps)) + eps`` (bias-corrected), a new tensor."""
    return (v / (1.0 - beta2**steps)).sqrt_().add_(eps)


def second_moment_gain(v: Tensor, steps: int, ratio: float, beta2: float, eps: float) -> Tensor:
    """k = sigma / (sigma + rho q) = 1 / (1 + ratio q)."""
    return rms_denominator(v, steps, beta2, eps).mul_(ratio).add_(1.0).reciprocal_()


@torch.no_grad()
def orthogonalised(x: Tensor, steps: int = 5) -> Tensor:
    """Approximately U V^T of ``x = U S V^T`` (Newton-Schulz), scaled by max(1, rows/cols)**0.5."""
    a, b, c = _NS_COEFFS
    y = x.float()
    tall = y.shape[0] > y.shape[1]
    if tall:
        y = y.T
    y = y / (y.norm() + 1e-7)
    for _ in range(steps):
        gram = y @ y.T
        y = a * y + (b * gram + c * gram @ gram) @ y
    if tall:
        y = y.T
    return y.to(x.dtype).mul_(math.sqrt(max(1.0, x.shape[0] / x.shape[1])))


def newton_schulz_direction(grad: Tensor, momentum: Tensor, mu: float, steps: int) -> Tensor:
    """Nesterov momentum (updated in place) orthogonalised: the local direction for a weight matrix."""
    momentum.mul_(mu).add_(grad)
    return orthogonalised(grad.add(momentum, alpha=mu), steps)


def normalized_direction(grad: Tensor, v: Tensor, steps: int, beta2: float, eps: float) -> Tensor:
    """``g / (sqrt(v_hat) + eps)`` after folding ``g`` into the second-moment EMA ``v`` (in place)."""
    fold_second_moment(v, grad, beta2)
    return grad / rms_denominator(v, steps, beta2, eps)


def normalized_directions(grads: list[Tensor], vs: list[Tensor], steps: list[int], beta2: float, eps: float,
                          foreach: bool) -> list[Tensor]:
    """:func:`normalized_direction` of many tensors, with the ``torch._foreach_*`` kernels when ``foreach``."""
    if not foreach:
        return [normalized_direction(g, v, k, beta2, eps) for g, v, k in zip(grads, vs, steps)]
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_div(vs, [1.0 - beta2**k for k in steps])
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    return torch._foreach_div(grads, denom)


def fused_second_moment(p: Tensor, g: Tensor, m: Tensor, v: Tensor, steps: int, *, lr: float, ratio: float,
                        beta2: float, eps: float, decay: float, track_dual: bool = False) -> None:
    """The exact shared-preconditioner step on one parameter; ``m = -pi`` (the negated mean dual).
    ``track_dual``: ``v`` tracks ``(g + pi)**2`` instead of ``g**2`` (not shown better, within the run-to-run
    spread: scripts/probe_second_moment_target.py, docs/preconditioners.md)."""
    t = g - m  # g + pi
    fold_second_moment(v, t if track_dual else g, beta2)
    u = second_moment_gain(v, steps, ratio, beta2, eps).mul_(t)  # (g + pi) / (1 + ratio q)
    if decay != 1.0:
        p.mul_(decay)
    p.add_(u, alpha=-2.0 * lr).add_(m, alpha=-lr)  # w - 2 u_t + pi / sigma_t, with u_t = lr u
    m.add_(u)  # pi <- pi - sigma_t u_t
