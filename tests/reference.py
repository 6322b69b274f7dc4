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


class LiteralNSISA:
    """The authors' NSISA step as their script writes it, slot by slot (per slot s, weight alpha_s)::

        M_s <- 0.95 M_s + g_s;  d_s = NS5(g_s + 0.95 M_s) sqrt(max(1, rows/cols));  c_s = d_s + pi_s
        D_s = sigma_t + rho_t (|c_s| + 1e-8);  w_s = w - c_s / D_s;  pi_s <- gamma_s (pi_s + sigma_t (w_s - w))
        w <- sum_s (alpha_s sigma_t w_s + pi_s) / sigma_t

    gamma_s = alpha_s (``dual_scale="weight"``) or 1 (``"one"``); sigma_t = sigma/f_t (or sigma/f_t**2,
    ``warm_down``), rho_t = rho/f_t."""

    def __init__(self, params: list[torch.Tensor], sigma: float, rho: float, dual_scale: str = "weight",
                 warm_down: bool = False):
        self.w = [p.detach().clone() for p in params]
        self.sigma, self.rho, self.dual_scale, self.warm_down = sigma, rho, dual_scale, warm_down
        self.slots: list[dict] = []

    def step(self, grads_per_slot: list[list[torch.Tensor]], weights: list[float], factor: float = 1.0) -> None:
        sigma = self.sigma / factor**2 if self.warm_down else self.sigma / factor
        rho = self.rho / factor
        alphas = [a / sum(weights) for a in weights]
        while len(self.slots) < len(grads_per_slot):
            self.slots.append({"M": [torch.zeros_like(w) for w in self.w], "pi": [torch.zeros_like(w) for w in self.w]})
        new_w = [torch.zeros_like(w) for w in self.w]
        for slot, grads, alpha in zip(self.slots, grads_per_slot, alphas):
            gamma = alpha if self.dual_scale == "weight" else 1.0
            for i, (w, g) in enumerate(zip(self.w, grads)):
                slot["M"][i] = 0.95 * slot["M"][i] + g
                d = newton_schulz5(g + 0.95 * slot["M"][i]) * max(1.0, g.shape[0] / g.shape[1]) ** 0.5
                c = d + slot["pi"][i]
                D = sigma + rho * (c.abs() + 1e-8)
                w_s = w - c / D
                slot["pi"][i] = gamma * (slot["pi"][i] + sigma * (w_s - w))
                new_w[i] = new_w[i] + (alpha * sigma * w_s + slot["pi"][i]) / sigma
        self.w = new_w


def normuon_rows(o: torch.Tensor, v: torch.Tensor, beta2: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """NorMuon (Li et al., arXiv:2510.05491) after Newton-Schulz, as its reference code: v <- beta2 v + (1 - beta2)
    mean over each row of o**2; o' = o / (sqrt(v) + 1e-10) row by row; o' scaled back to o's Frobenius norm
    (||o|| / (||o'|| + 1e-10)). Returns (o', v)."""
    v = beta2 * v + (1 - beta2) * (o * o).mean(dim=-1, keepdim=True)
    scaled = o / (v.sqrt() + 1e-10)
    return scaled * (o.norm() / (scaled.norm() + 1e-10)), v


def polar_express5(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Polar Express (Amsel et al., arXiv:2505.16932, Algorithm 1) in x's dtype: its per-iteration quintics with the
    safety factor 1.01 on all but the last, X = x / (1.01 ||x||_F + 1e-7) on the wide orientation."""
    table = [(8.28721201814563, -23.595886519098837, 17.300387312530933),
             (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
             (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
             (3.3184196573706015, -2.488488024314874, 0.51004894012372),
             (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
             (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
             (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
             (1.875, -1.25, 0.375)]
    table = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in table[:-1]] + [table[-1]]
    tall = x.shape[0] > x.shape[1]
    X = x.T if tall else x
    X = X / (X.norm() * 1.01 + 1e-7)
    for a, b, c in (table + [table[-1]] * steps)[:steps]:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X
