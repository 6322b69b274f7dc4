r"""``preconditioner="normuon"``: newton_schulz's direction with NorMuon's row normalisation after Newton-Schulz
(Li et al., arXiv:2510.05491). With O the orthogonalised direction of a matrix (before its lr scale)::

    v <- beta v + (1 - beta) mean_j O_ij**2          (one number per row, beta = normuon_beta2 = 0.95)
    O' = O / (sqrt(v) + 1e-10)                        (row by row)
    d  = O' ||O||_F / (||O'||_F + 1e-10)              (the Frobenius norm restored)

then the scale of ``ns_lr_scale``. A fused projection's parts (``MatrixView``) are matrices of their own: each part's
norm is restored on its own, as separate layers would get. Fused at rho = sigma (the default) this is NorMuon; elsewhere
BADM's dual acts on it as on newton_schulz's direction. A 3-D stack of expert matrices is normalised per expert. The
Frobenius norm is a whole matrix's: on sharded engines (a DTensor shard, a flat ZeRO partition) it is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hf_badm.optim.local_solve import register_local_solve
from hf_badm.optim.solves.newton_schulz import row_scales
from hf_badm.optim.solves.newton_schulz import NewtonSchulz, matrix_view, whole_matrices
from hf_badm.optim.validation import fraction

ROW_EPS = 1e-10  # NorMuon's, in the row scale and the norm restoration


@register_local_solve
class NorMuon(NewtonSchulz):
    name = "normuon"
    state_keys = ("momentum_buffer", "row_sq")
    settings = {**NewtonSchulz.settings, "normuon_beta2": 0.95}

    @classmethod
    def check_settings(cls, group: dict[str, Any]) -> None:
        super().check_settings(group)
        if "normuon_beta2" in group:
            fraction("normuon_beta2", group["normuon_beta2"])

    def new_state(self, p: Tensor) -> dict[str, Any]:
        return {**super().new_state(p), "row_sq": p.new_zeros(self.state_shape("row_sq", p))}

    def state_shape(self, key: str, p: Tensor) -> torch.Size:
        """``row_sq``: one number per output row (the last dimension of a weight stored transposed)."""
        if key != "row_sq":
            return p.shape
        return p.shape[:-2] + (p.shape[-1], 1) if matrix_view(p).transposed else p.shape[:-1] + (1,)

    def finish(self, params: list[Tensor], directions: list[Tensor], gains: list[Tensor] | None,
               duals: list[Tensor] | None, states: list[dict[str, Any]], group: dict[str, Any],
               foreach: bool) -> tuple[list[Tensor], list[Tensor] | None]:
        whole_matrices(params, "normuon")
        if any(type(d).__name__ == "DTensor" for d in directions):
            raise ValueError("normuon restores each matrix's Frobenius norm, which a shard of an FSDP2 matrix does not "
                             "hold: use newton_schulz there")
        beta = group["normuon_beta2"]
        out = []
        for p, d, state in zip(params, directions, states):
            view = matrix_view(p)
            scale = row_scales(p.shape, view, group["ns_lr_scale"]).to(d)  # the orthogonaliser's, per output row
            o = (d.mT if view.transposed else d) / scale  # NorMuon acts on O before the scale, rows = outputs
            v = state["row_sq"]
            v.lerp_((o * o).mean(dim=-1, keepdim=True), 1.0 - beta)
            scaled = o / (v.sqrt() + ROW_EPS)
            # each part's norm restored on its own (a fused projection's parts step as separate layers would)
            o = scaled.mul_(view.part_norms(o) / (view.part_norms(scaled) + ROW_EPS)).mul_(scale)
            out.append(o.mT if view.transposed else o)
        return super().finish(params, out, gains, duals, states, group, foreach)
