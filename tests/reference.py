"""A deliberately literal, slow BADM (docs/algorithm.md §2): per-slot w_s and pi_s, aggregation as written.

Used only by the tests; it shares no code with hf_badm.
"""

from __future__ import annotations

import torch


class LiteralBADM:
    """Holds the global w and, per slot s, w_s and pi_s; step() takes each sub-batch's gradient at w."""

    def __init__(self, params: list[torch.Tensor], sigma: float, rho: float, weight_decay: float = 0.0):
        self.w = [p.detach().clone() for p in params]
        self.sigma, self.rho, self.weight_decay = sigma, rho, weight_decay
        self.slots: list[dict[str, list[torch.Tensor]]] = []

    def step(self, grads_per_slot: list[list[torch.Tensor]], weights: list[float], factor: float = 1.0) -> None:
        sigma, rho = self.sigma / factor, self.rho / factor  # schedule factor f_t scales both penalties
        total = sum(weights)
        alphas = [a / total for a in weights]
        while len(self.slots) < len(grads_per_slot):
            self.slots.append({"w": [w.clone() for w in self.w], "pi": [torch.zeros_like(w) for w in self.w]})
        for s, grads in enumerate(grads_per_slot):
            slot = self.slots[s]
            for i, (w, g) in enumerate(zip(self.w, grads)):
                slot["w"][i] = w - (g + slot["pi"][i]) / (sigma + rho)
                slot["pi"][i] = slot["pi"][i] + sigma * (slot["w"][i] - w)
        new_w = []
        for i, w in enumerate(self.w):
            agg = sum(alphas[s] * (self.slots[s]["w"][i] + self.slots[s]["pi"][i] / sigma)
                      for s in range(len(grads_per_slot)))
            new_w.append(agg - (self.weight_decay / sigma) * w)  # decoupled decay of the old w
        self.w = new_w


def newton_schulz5(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration as published (Keller Jordan, 2024), in x's dtype: on the wide
    orientation, X = x / (||x||_F + 1e-7), then X <- a X + (b A + c A^2) X with A = X X^T."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = x.shape[0] > x.shape[1]
    X = x.T if tall else x
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


class NesterovNS:
    """Muon's direction for a list of matrices: B <- mu B + G; O = NS5(G + mu B) sqrt(max(1, rows/cols))."""

    def __init__(self, params: list[torch.Tensor], mu: float = 0.95):
        self.mu = mu
        self.bufs = [torch.zeros_like(p) for p in params]

    def __call__(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        self.bufs = [self.mu * b + g for b, g in zip(self.bufs, grads)]
        return [newton_schulz5(g + self.mu * b) * max(1.0, g.shape[0] / g.shape[1]) ** 0.5
                for g, b in zip(grads, self.bufs)]


class LiteralMuon:
    """Muon on matrices as published (Nesterov momentum, NS5, the sqrt(max(1, rows/cols)) scale) with
    decoupled weight decay: W <- W (1 - lr wd) - lr O."""

    def __init__(self, params: list[torch.Tensor], lr: float, mu: float = 0.95, weight_decay: float = 0.0):
        self.w = [p.detach().clone() for p in params]
        self.lr, self.weight_decay = lr, weight_decay
        self.direction = NesterovNS(params, mu)

    def step(self, grads: list[torch.Tensor], factor: float = 1.0) -> None:
        lr = self.lr * factor
        self.w = [w * (1 - lr * self.weight_decay) - lr * o for w, o in zip(self.w, self.direction(grads))]
