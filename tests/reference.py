"""A deliberately literal, slow BADM (../shared/BADM.md §2): per-slot w_s and pi_s, aggregation as written.

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
