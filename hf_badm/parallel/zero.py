"""DeepSpeed ZeRO: BADM steps flat fp32 partitions, each a piece of several whole matrices. A
:class:`ZeroMatrixLayout`, registered beside each partition of an orthogonalising group, tells the orthogonaliser
which elements of which matrix a partition holds; :func:`attach_engine_layouts` registers them once DeepSpeed has
built its partitions (``BADMMetricsCallback.on_train_begin``, a public Trainer hook on every version)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from hf_badm.optim.badm import BADM
from hf_badm.optim.solves.newton_schulz import MatrixView, matrix_view
from hf_badm.parallel.orthogonalise import ParallelOrthogonaliser, register_matrix_layout

__all__ = ["ZeroPartitionLayout", "ZeroMatrixLayout", "ZeroPartition", "zero_partitions", "attach_zero_layouts",
           "zero_optimizer_of", "attach_engine_layouts"]


class ZeroPartitionLayout:
    """Where the tensors of one ZeRO flat fp32 partition live. ZeRO-1/2 (``offsets``): the ranks' partitions are
    consecutive slices of one flat buffer holding the tensors at ``offsets``. ZeRO-3 (``pieces``): each tensor is
    partitioned on its own (``pieces[j]`` elements per rank, padded), and a rank's partition is its pieces of every
    tensor, concatenated. Either way ``sizes[j][r]`` elements of tensor j sit on rank r, in rank order, and this rank's
    begin at ``starts[j]`` of its partition."""

    def __init__(self, shapes: list[torch.Size], group: dist.ProcessGroup | None, partition_numel: int, *,
                 offsets: list[int] | None = None, pieces: list[int] | None = None) -> None:
        if (offsets is None) == (pieces is None):
            raise ValueError("a ZeRO partition layout takes offsets (stage 1/2) or pieces (stage 3)")
        self.shapes, self.group = [torch.Size(s) for s in shapes], group
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        numels = [s.numel() for s in self.shapes]
        if pieces is not None:  # stage 3: piece r of tensor j is its elements [r * piece, (r + 1) * piece)
            self.sizes = [[max(0, min(k, n - r * k)) for r in range(world)] for n, k in zip(numels, pieces)]
            self.starts = [sum(pieces[:j]) for j in range(len(pieces))]
        else:  # stage 1/2: rank r holds the flat buffer's [r * P, (r + 1) * P)
            P = partition_numel
            self.sizes = [[max(0, min(o + n, (r + 1) * P) - max(o, r * P)) for r in range(world)]
                          for o, n in zip(offsets, numels)]
            self.starts = [max(0, o - self.rank * P) for o in offsets]

    def spans(self) -> list[tuple[int, int, int]]:
        """``(first, end, start)`` per tensor: this rank holds elements ``[first, end)`` of the whole flattened tensor,
        at ``[start, start + end - first)`` of its partition."""
        out = []
        for sizes, start in zip(self.sizes, self.starts):
            first = sum(sizes[:self.rank])
            out.append((first, first + sizes[self.rank], start))
        return out


class ZeroMatrixLayout(ZeroPartitionLayout):
    """A :class:`ZeroPartitionLayout` of whole matrices, for the orthogonaliser: ``views[j]`` are the maps matrix j
    holds (its parameter's :func:`~hf_badm.optim.solves.newton_schulz.matrix_view`)."""

    def __init__(self, shapes: list[torch.Size], views: list[MatrixView], group: dist.ProcessGroup | None,
                 partition_numel: int, *, offsets: list[int] | None = None, pieces: list[int] | None = None) -> None:
        super().__init__(shapes, group, partition_numel, offsets=offsets, pieces=pieces)
        self.views = views

    def matrices(self, x: Tensor) -> list[tuple[torch.Size, list[int], Tensor, MatrixView]]:
        """(shape, sizes, this rank's elements of it in ``x``, its maps) for each matrix."""
        return [(shape, sizes, x[start:start + sizes[self.rank]], view)
                for shape, sizes, start, view in zip(self.shapes, self.sizes, self.starts, self.views)]

    def output(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """A partition for the directions (zero padding) and the views its pieces are written to."""
        out = torch.zeros_like(x)
        return out, [piece for _, _, piece, _ in self.matrices(out)]


class ZeroPartition(NamedTuple):
    """One flat fp32 partition of a ZeRO optimizer: the BADM param group it is in, the partition (BADM's parameter and
    the key of its state), the module parameters it holds pieces of, their whole shapes, the data-parallel group and
    where the pieces are (:class:`ZeroPartitionLayout`'s ``offsets`` or ``pieces``)."""

    group: int
    flat: Tensor
    params: list[Tensor]
    shapes: list[torch.Size]
    process_group: Any
    where: dict[str, list[int]]

    def layout(self) -> ZeroPartitionLayout:
        return ZeroPartitionLayout(self.shapes, self.process_group, self.flat.numel(), **self.where)


def zero_partitions(zero_optimizer: Any) -> list[ZeroPartition]:
    """Every flat fp32 partition of a DeepSpeed ZeRO optimizer, from DeepSpeed's own records."""
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3: one flat partition per sub-group
        return [ZeroPartition(zero_optimizer.sub_group_to_group_id[sub], flat, params, [p.ds_shape for p in params],
                              zero_optimizer.sub_group_process_groups[sub],
                              {"pieces": [p.partition_numel() for p in params]})
                for sub, (flat, params) in enumerate(zip(zero_optimizer.fp32_partitioned_groups_flat,
                                                         zero_optimizer.fp16_groups))]
    return [ZeroPartition(i, flat, params, [m.shape for m in zero_optimizer.round_robin_bit16_meta[i]],
                          zero_optimizer.real_dp_process_group[i],
                          {"offsets": list(zero_optimizer.round_robin_bit16_offsets[i])})
            for i, (flat, params) in enumerate(zip(zero_optimizer.single_partition_of_fp32_groups,
                                                   zero_optimizer.round_robin_bit16_groups))]


def attach_zero_layouts(zero_optimizer: Any) -> int:
    """Register the flat fp32 partitions of a DeepSpeed ZeRO optimizer whose BADM group orthogonalises with their
    :class:`ZeroMatrixLayout` (their whole shapes from DeepSpeed's own records), and make sure the BADM inside has the
    :class:`ParallelOrthogonaliser` (a 1-rank ZeRO run needs it too). Returns how many partitions were registered.
    Such groups are made by ``badm_param_groups`` and hold whole weight matrices (and expert stacks) only."""
    badm: BADM = zero_optimizer.optimizer
    tagged = 0
    for part in zero_partitions(zero_optimizer):
        if badm.group_orthogonalises(badm.param_groups[part.group]):
            register_matrix_layout(part.flat, ZeroMatrixLayout(part.shapes, [matrix_view(p) for p in part.params],
                                                               part.process_group, part.flat.numel(), **part.where))
            tagged += 1
    if tagged and not isinstance(badm.orthogonaliser, ParallelOrthogonaliser):
        badm.orthogonaliser = ParallelOrthogonaliser()
    return tagged


def zero_optimizer_of(optimizer: Any) -> Any | None:
    """The DeepSpeed ZeRO optimizer that partitions a BADM, inside an optimizer wrapper (Accelerate's), or None."""
    while optimizer is not None and not isinstance(optimizer, BADM):
        if isinstance(getattr(optimizer, "optimizer", None), BADM) and (
                hasattr(optimizer, "fp32_partitioned_groups_flat") or hasattr(optimizer, "single_partition_of_fp32_groups")):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def attach_engine_layouts(optimizer: Any) -> int:
    """:func:`attach_zero_layouts` for the ZeRO optimizer inside an optimizer wrapper (Accelerate's), if any; 0
    when no engine partitions BADM. Idempotent: call it whenever the engine may have (re)built its partitions."""
    zero = zero_optimizer_of(optimizer)
    return 0 if zero is None else attach_zero_layouts(zero)
