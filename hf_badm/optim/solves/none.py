"""``preconditioner="none"``: the paper's local solve, one gradient step, w_s = w - (g_s + pi_s) / (sigma + rho)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from hf_badm.optim.local_solve import LocalSolve, register_local_solve

# Plain BADM takes SGD-scale steps: its best lr was 3 (tiny) and 3 (small), lr 1 still within 1.4x of the best loss,
# and lr 1e-2 (AdamW's scale) barely trains (eval 6.05 vs 5.21 at lr 3): a learning rate below this warns.
SGD_SCALE_MIN_LR = 0.3


@register_local_solve
class Plain(LocalSolve):
    """Direction ``d = g``, scalar gain: no state of its own. rho/sigma 9 (beta 0.9): robust at both sizes."""

    name = "none"
    plain = True

    @classmethod
    def lr_warning(cls, lr: float) -> str | None:
        if lr >= SGD_SCALE_MIN_LR:
            return None
        return (f"learning_rate={lr:g} looks like an AdamW learning rate, but plain BADM takes SGD-scale steps "
                f"(lr = 1/sigma): it would train very slowly with sigma={1 / lr:g}. Use learning_rate around 1 (sigma "
                "around 1), or set BADMConfig(sigma=...).")

    def directions(self, grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any],
                   foreach: bool) -> tuple[list[Tensor], None]:
        return grads, None
