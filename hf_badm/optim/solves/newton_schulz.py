r"""``preconditioner="newton_schulz"`` (NSISA-like): on weight matrices the local direction is
Newton-Schulz orthogonalised Nesterov momentum (Muon's direction)::

    M <- mu M + g;   d = NS5(g + mu M) * max(1, rows/cols)**0.5

used in place of the gradient in the paper's local solve (scalar gain, D = sigma + rho). A 3-D tensor is a
stack of matrices (MoE experts fused as ``(experts, out, in)``): each expert slice is orthogonalised on its
own, as if the experts were separate linear layers. The orthogonalisation itself is ``BADM.orthogonaliser``
(all of a step's matrices in one call); every other tensor falls back to ``second_moment`` (unless its
param group is ``strict``).

Settings (param-group keys): ``ns_momentum`` (mu, 0.95), ``ns_steps`` (5), ``ns_coefficients`` (``"muon"``: the
quintic (3.4445, -4.7750, 2.0315) every iteration; ``"polar_express"``: Polar Express's polynomial per
iteration) and ``ns_lr_scale`` (``"original"``: the scale sqrt(max(1, rows/cols)); ``"match_rms_adamw"``:
0.2 sqrt(max(rows, cols)), Moonshot's, whose update RMS matches AdamW's so that the matrices share AdamW's lr and
weight decay). rho = sigma by default: at rho = sigma fused mode is Muon.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Union

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from hf_badm.optim.local_solve import LocalSolve, register_local_solve
from hf_badm.optim.validation import count, fraction, one_of

__all__ = ["NewtonSchulz", "ns_applies", "mark_partition", "is_partition", "MATRIX_DIMS", "whole_matrices",
           "register_matrix_view", "matrix_view", "MatrixView", "WHOLE", "NSSchedule", "Iterations", "NS_COEFFICIENTS",
           "NS_DTYPES", "NS_LR_SCALES", "lr_scale", "row_scales", "polar_express", "resolve_ns_dtype", "orthogonalised",
           "orthogonalise", "Orthogonaliser", "local_orthogonaliser"]

# Quintic Newton-Schulz coefficients (Muon's) that drive all singular values towards ~1 in five steps.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# The per-iteration quintics of Polar Express (Amsel, Persson, Musco & Gower, arXiv:2505.16932, Algorithm 1): each
# minimises the worst-case distance to sign(x) on the interval the previous ones leave; the last repeats.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS_SAFETY = 1.01  # the paper's margin for half precision: input norm and all but the last polynomial

@dataclass(frozen=True)
class NSSchedule:
    """Newton-Schulz with its own quintic per iteration, on the input scaled to Frobenius norm 1/``margin``, each
    matrix's direction then scaled by the rule ``lr_scale`` (:func:`lr_scale`)."""

    coefficients: tuple[tuple[float, float, float], ...]
    margin: float = 1.0
    lr_scale: str = "original"


# How an orthogonalised (rows x cols) direction is scaled: "original" (Keller Jordan's, torch.optim.Muon's default)
# sqrt(max(1, rows/cols)); "match_rms_adamw" (Moonshot's) 0.2 sqrt(max(rows, cols)), whose update RMS matches AdamW's.
NS_LR_SCALES = ("original", "match_rms_adamw")


def lr_scale(rows: int, cols: int, rule: str = "original") -> float:
    """The factor of :data:`NS_LR_SCALES` rule ``rule`` for one (rows x cols) linear map (rows = outputs)."""
    return 0.2 * math.sqrt(max(rows, cols)) if rule == "match_rms_adamw" else math.sqrt(max(1.0, rows / cols))


@dataclass(frozen=True)
class MatrixView:
    """How a stored weight holds the linear maps Newton-Schulz acts on, one each. ``transposed``: stored as
    (..., in, out) (transformers' ``Conv1D``, experts stored transposed), so the map is the transpose. ``order`` and
    ``sizes``: a fused projection's parts (Q, K and V; gate and up): the output rows, permuted so that each part is
    contiguous (None: in stored order), and each part's row count (None: one part). Every part is orthogonalised and
    scaled as the (rows x in) map it is, as if it were a layer of its own. Read from what the module is
    (``hf_badm.roles``), never guessed from the shape."""

    transposed: bool = False
    order: tuple[int, ...] | None = None
    sizes: tuple[int, ...] | None = None

    @cached_property
    def _index(self) -> Tensor:
        """``order`` as an index tensor, made once per view (the step reads it every time)."""
        return torch.tensor(self.order)

    def maps(self, x: Tensor) -> list[Tensor]:
        """The (..., rows, in) maps of stored ``x``, in part order (views where possible)."""
        m = x.mT if self.transposed else x
        if self.order is not None:
            m = m.index_select(-2, self._index.to(m.device))
        return list(m.split(list(self.sizes), dim=-2)) if self.sizes is not None else [m]

    def part_norms(self, m: Tensor) -> Tensor:
        """The Frobenius norm of each part of ``m`` (..., rows, in): the maps' orientation, rows in stored order), at
        each of the part's rows: (..., rows, 1). One part (``sizes`` None): the whole matrix's norm, (..., 1, 1)."""
        if self.sizes is None:
            return torch.linalg.vector_norm(m, dim=(-2, -1), keepdim=True)
        square = (m * m).sum(dim=-1, keepdim=True)
        if self.order is not None:
            square = square.index_select(-2, self._index.to(m.device))
        norms = torch.cat([part.sum(dim=-2, keepdim=True).sqrt().expand_as(part)
                           for part in square.split(list(self.sizes), dim=-2)], dim=-2)
        if self.order is not None:
            norms = torch.empty_like(norms).index_copy_(norms.dim() - 2, self._index.to(m.device), norms)
        return norms

    def stored(self, maps: list[Tensor], like: Tensor) -> Tensor:
        """The inverse of :meth:`maps`: the parts put back into ``like``'s stored layout (a new tensor)."""
        m = torch.cat(maps, dim=-2) if len(maps) > 1 else maps[0]
        if self.order is not None:
            m = torch.empty_like(m).index_copy_(m.dim() - 2, self._index.to(m.device), m)
        return (m.mT if self.transposed else m).reshape(like.shape)


WHOLE = MatrixView()


def row_scales(shape: torch.Size, view: MatrixView, rule: str) -> Tensor:
    """The :func:`lr_scale` of each output row of a weight of stored ``shape`` under ``view`` (rows in stored order),
    as a float64 (rows, 1) column."""
    cols = shape[-2] if view.transposed else shape[-1]
    rows = shape[-1] if view.transposed else shape[-2]
    sizes = view.sizes or (rows,)
    scales = torch.cat([torch.full((n,), lr_scale(n, cols, rule), dtype=torch.float64) for n in sizes])
    if view.order is not None:
        scales = torch.empty_like(scales).index_copy_(0, view._index, scales)
    return scales.unsqueeze(-1)


# What BADM.orthogonaliser takes as ``steps``: a count of Muon's quintic iterations, or a schedule.
Iterations = Union[int, NSSchedule]


def polar_express(steps: int) -> NSSchedule:
    """Polar Express's first ``steps`` polynomials (the last repeated), with the paper's safety factor 1.01."""
    safe = [(a / POLAR_EXPRESS_SAFETY, b / POLAR_EXPRESS_SAFETY**3, c / POLAR_EXPRESS_SAFETY**5)
            for a, b, c in POLAR_EXPRESS_COEFFICIENTS[:-1]] + [POLAR_EXPRESS_COEFFICIENTS[-1]]
    chosen = safe[:steps] + [safe[-1]] * max(0, steps - len(safe))
    return NSSchedule(tuple(chosen), POLAR_EXPRESS_SAFETY)


def _plan(steps: Iterations) -> tuple[tuple[tuple[float, float, float], ...], float, str]:
    """The coefficients of each iteration, the norm margin and the lr-scale rule."""
    if isinstance(steps, NSSchedule):
        return steps.coefficients, steps.margin, steps.lr_scale
    return (NS_COEFFICIENTS,) * steps, 1.0, "original"
# ns_dtype: "auto" is bfloat16 on CUDA (as torch.optim.Muon) and float32 elsewhere.
NS_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "float64": torch.float64}



def resolve_ns_dtype(ns_dtype: str, device: torch.device) -> torch.dtype:
    """The dtype Newton-Schulz runs in: ``"auto"`` is bfloat16 on CUDA (as torch.optim.Muon), float32 elsewhere."""
    dtype = NS_DTYPES[ns_dtype]
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype


@torch.no_grad()
def orthogonalised(x: Tensor, steps: Iterations = 5, dtype: torch.dtype = torch.float32) -> Tensor:
    """Approximately ``U V^T`` of ``x = U S V^T`` (Newton-Schulz in ``dtype``), times max(1, rows/cols)**0.5."""
    return orthogonalise([x], steps, dtype)[0]


def _newton_schulz_2d(x: Tensor, steps: Iterations) -> Tensor:
    """The quintic iteration on one wide matrix, in its dtype (``orthogonalise``'s CPU form)."""
    coefficients, margin, _ = _plan(steps)
    y = x / (torch.linalg.vector_norm(x) * margin + 1e-7)
    for a, b, c in coefficients:
        gram = y @ y.T
        y = torch.addmm(y, torch.addmm(gram, gram, gram, beta=b, alpha=c), y, beta=a)
    return y


@torch.no_grad()
def orthogonalise(inputs: list[Tensor], steps: Iterations, dtype: torch.dtype, batched: bool | None = None,
                  views: list[MatrixView] | None = None) -> list[Tensor]:
    """:func:`orthogonalised` of each input, in ``dtype``: a 2-D input is one matrix, a 3-D input a stack of
    matrices (MoE experts fused as ``(experts, out, in)``), each slice orthogonalised on its own, and each input's
    :class:`MatrixView` (``views``, default whole and untransposed) says which maps it holds::

        X <- X / (||X||_F + 1e-7);  5 times: A = X X^T;  X <- a X + (b A + c A A) X

    with Muon's (a, b, c) when ``steps`` is a count, or a :class:`NSSchedule`'s own per iteration (and its norm
    margin), on the wide orientation (``X^T`` for tall matrices). On accelerators the matrices of one shape are stacked
    and iterated together (one batched-matmul chain per shape: fewer launches); on the CPU, where a batched
    matmul ran slower than the same matmuls one by one (bfloat16 and float32, this machine), matrix by matrix.
    ``batched`` forces one form (tests). The default orthogonaliser of ``BADM`` on one process."""
    for x in inputs:
        if type(x).__name__ == "DTensor" or x.dim() not in (2, 3):
            raise ValueError(f"Newton-Schulz needs whole matrices, got a {type(x).__name__} of shape {tuple(x.shape)}: a "
                             "sharded parameter (FSDP2, DeepSpeed ZeRO) needs the orthogonaliser of hf_badm.parallel, "
                             "which BADMTrainer and create_badm_optimizer install (parallel.prepare_for_ranks)")
    coefficients, margin, rule = _plan(steps)
    views = views or [WHOLE] * len(inputs)
    maps = [view.maps(x) for view, x in zip(views, inputs)]
    flat = [m for ms in maps for m in ms]
    out: list[Tensor | None] = [None] * len(flat)
    by_shape: dict[tuple[torch.Size, torch.device], list[int]] = {}
    for i, x in enumerate(flat):
        by_shape.setdefault((x.shape[-2:], x.device), []).append(i)
    for (shape, device), idx in by_shape.items():
        tall = shape[0] > shape[1]
        stacks = [flat[i].reshape(-1, *shape) for i in idx]  # every map as (matrices, rows, cols)
        wide = [(x.mT if tall else x).to(dtype) for x in stacks]  # iterate on the wide orientation
        if not (device.type != "cpu" if batched is None else batched):  # CPU: matrix by matrix, fused as addmm
            done = [torch.stack([_newton_schulz_2d(m, steps) for m in x]) if len(x) > 1
                    else _newton_schulz_2d(x[0], steps).unsqueeze(0) for x in wide]
        else:  # on accelerators one batched chain per shape saves the launches
            y = torch.cat(wide)
            y /= torch.linalg.vector_norm(y, dim=(-2, -1), keepdim=True).mul_(margin).add_(1e-7)
            for a, b, c in coefficients:  # y <- a y + (b A + c A A) y, A = y y^T
                gram = y @ y.mT
                y = torch.baddbmm(y, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), y, beta=a)
            done = list(y.split([x.shape[0] for x in wide]))
        scale = lr_scale(shape[0], shape[1], rule)
        for i, d in zip(idx, done):
            out[i] = (d.mT if tall else d).to(flat[i].dtype).mul_(scale).reshape(flat[i].shape)
    directions, start = [], 0
    for view, x, ms in zip(views, inputs, maps):
        directions.append(view.stored(out[start:start + len(ms)], x))  # type: ignore[arg-type]
        start += len(ms)
    return directions


NS_COEFFICIENT_SETS = ("muon", "polar_express")


# Flat tensors that hold pieces of several whole matrices (DeepSpeed ZeRO's fp32 partitions): Newton-Schulz acts on
# them through an engine's orthogonaliser, which knows where their matrices are (hf_badm.parallel keeps those layouts).
# Kept beside the tensors, weakly, rather than on them: a tensor's attributes would travel into its checkpoints.
_PARTITIONS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def mark_partition(p: Tensor) -> None:
    """Declare ``p`` a flat partition of whole matrices (the engine side registers where they are)."""
    _PARTITIONS[p] = True


def is_partition(p: Tensor) -> bool:
    """Whether ``p`` was declared a flat partition of whole matrices (:func:`mark_partition`)."""
    return p in _PARTITIONS


# Which linear maps each weight holds (transposed storage, a fused projection's parts), registered by whoever knows
# what the weight is (``hf_badm.factory`` from ``hf_badm.roles``); kept weakly beside the tensors, as the layouts.
_MATRIX_VIEWS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def register_matrix_view(p: Tensor, view: MatrixView) -> None:
    """Declare how ``p`` holds its linear maps (:class:`MatrixView`); the whole untransposed tensor is the default."""
    if view == WHOLE:
        _MATRIX_VIEWS.pop(p, None)
    else:
        _MATRIX_VIEWS[p] = view


def matrix_view(p: Tensor) -> MatrixView:
    """The :class:`MatrixView` registered for ``p`` (default: the whole tensor, as stored)."""
    return _MATRIX_VIEWS.get(p, WHOLE)


# Orthogonaliser(params, inputs, steps, dtype) -> directions: the Newton-Schulz seam of BADM (class docstring).
Orthogonaliser = Callable[[list[Tensor], list[Tensor], Iterations, torch.dtype], list[Tensor]]


def local_orthogonaliser(params: list[Tensor], inputs: list[Tensor], steps: Iterations,
                         dtype: torch.dtype) -> list[Tensor]:
    """The orthogonaliser of one process: every input is a whole matrix (or a stack of expert matrices), holding the
    maps its parameter's :func:`~hf_badm.optim.solves.newton_schulz.matrix_view` says."""
    for p in params:
        if is_partition(p):
            raise ValueError("this parameter is a partition of several matrices (DeepSpeed ZeRO): Newton-Schulz needs the "
                             "orthogonaliser of hf_badm.parallel that gathers them (parallel.prepare_for_ranks)")
    return orthogonalise(inputs, steps, dtype, views=[matrix_view(p) for p in params])


MATRIX_DIMS = (2, 3)  # a matrix, or a stack of expert matrices


def ns_applies(p: Tensor) -> bool:
    """Newton-Schulz acts on matrices and stacks of expert matrices by their whole shape (the one place this rule
    lives: a DTensor's ``dim()`` is its global one), or on a flat partition registered with the whole matrices it
    belongs to (:func:`mark_partition`). The caller that builds param groups decides from the whole shape of
    a partitioned parameter (``hf_badm.parallel.full_shape``) and keeps embeddings out."""
    return NewtonSchulz.takes_shape(p.shape) or is_partition(p)


def whole_matrices(params: list[Tensor], what: str) -> None:
    """Refuse flat partitions of several matrices (DeepSpeed ZeRO): ``what`` needs each matrix's shape."""
    if any(is_partition(p) for p in params):
        raise ValueError(f"{what} needs each matrix's own shape, and this parameter is a flat DeepSpeed ZeRO partition "
                         "of several matrices: use it without ZeRO (DDP, or FSDP2)")


@register_local_solve
class NewtonSchulz(LocalSolve):
    name = "newton_schulz"
    state_keys = ("momentum_buffer",)
    orthogonalises = True
    fallback = "second_moment"
    applies = staticmethod(ns_applies)
    settings = {"ns_momentum": 0.95, "ns_steps": 5, "ns_coefficients": "muon", "ns_lr_scale": "original"}
    rho_over_sigma = 1.0  # its direction carries its own momentum; at rho = sigma it is Muon

    @classmethod
    def check_settings(cls, group: dict[str, Any]) -> None:
        if "ns_momentum" in group:
            fraction("ns_momentum", group["ns_momentum"])
        if "ns_steps" in group:
            count("ns_steps", group["ns_steps"])
        if "ns_coefficients" in group:
            one_of("ns_coefficients", group["ns_coefficients"], NS_COEFFICIENT_SETS)
        if "ns_lr_scale" in group:
            one_of("ns_lr_scale", group["ns_lr_scale"], NS_LR_SCALES)

    def iterations(self, group: dict[str, Any]) -> Iterations:
        """Muon's quintic ``ns_steps`` times (a count), or a schedule with Polar Express's polynomials and/or
        another lr scale (the orthogonaliser scales every map, each part of a fused projection on its own)."""
        steps, rule = group["ns_steps"], group["ns_lr_scale"]
        if group["ns_coefficients"] == "polar_express":
            return replace(polar_express(steps), lr_scale=rule)
        return steps if rule == "original" else NSSchedule((NS_COEFFICIENTS,) * steps, 1.0, rule)

    @staticmethod
    def takes_shape(shape: torch.Size) -> bool:
        return len(shape) in MATRIX_DIMS

    def new_state(self, p: Tensor) -> dict[str, Any]:
        return {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def directions(self, grads: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any],
                   foreach: bool) -> tuple[list[Tensor], None]:
        """The Newton-Schulz inputs ``g + mu M`` (after ``M <- mu M + g``)."""
        mu, bufs = group["ns_momentum"], [s["momentum_buffer"] for s in states]
        if foreach:
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads)
            return torch._foreach_add(grads, bufs, alpha=mu), None
        for m, g in zip(bufs, grads):
            m.mul_(mu).add_(g)
        return [g.add(m, alpha=mu) for g, m in zip(grads, bufs)], None
