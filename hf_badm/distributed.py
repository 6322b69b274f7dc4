"""BADM across data-parallel ranks: the per-sub-batch aggregation (one all-reduce of the slot aggregates per step)
and the Newton-Schulz work split of fused mode (each matrix orthogonalised on one rank, one all_gather)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from hf_badm.optim.badm import BADM, Orthogonalizer
from hf_badm.optim.preconditioned import orthogonalise
from hf_badm.optim.solves.newton_schulz import register_matrix_layout

__all__ = ["all_reduce_aggregator", "world_size", "assign_owners", "SplitOrthogonalizer", "prepare_for_ranks",
           "ZeroMatrixLayout", "attach_zero_layouts"]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def all_reduce_aggregator(aggregates: list[Tensor], weight_sum: float) -> float:
    """Sum every rank's aggregate buffers and weight sums in place; return the global weight sum.

    The buffers are packed into one flat tensor per (device, dtype) with the weight sum appended to
    the first, so a step costs one parameter-sized collective: the volume of plain DDP's all-reduce.
    Every rank then applies the same summed aggregate to the same parameters: replicas stay identical.
    """
    if world_size() == 1:
        return weight_sum
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in aggregates:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    weight_done = False
    total = weight_sum
    for (device, dtype), tensors in buckets.items():
        carry = not weight_done and dtype in (torch.float32, torch.float64)
        parts = [t.reshape(-1) for t in tensors]
        if carry:
            parts.append(torch.tensor([weight_sum], device=device, dtype=dtype))
        flat = torch.cat(parts)
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        if carry:
            total, weight_done = float(flat[-1]), True
    if not weight_done:
        w = torch.tensor([weight_sum], dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(w)
        total = float(w)
    return total


def _ns_cost(shape: torch.Size) -> int:
    """Newton-Schulz work of one matrix, up to a constant: its products cost min(m, n)^2 max(m, n)."""
    m, n = shape[-2], shape[-1]
    return min(m, n) ** 2 * max(m, n)


def assign_owners(shapes: list[torch.Size], world: int) -> list[int]:
    """The rank that orthogonalises each matrix: largest first onto the least-loaded rank (deterministic, so every
    rank computes the same assignment without communicating)."""
    load = [0] * world
    owners = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-_ns_cost(shapes[i]), i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += _ns_cost(shapes[i])
    return owners


class SplitOrthogonalizer:
    """``BADM.orthogonalizer`` for fused mode on several data-parallel ranks: each Newton-Schulz matrix is
    orthogonalised on one rank only (balanced by cost), and one ``all_gather`` per dtype brings every direction to
    every rank, so the replicas stay bit-identical and each rank does about 1/W of the matmul work.

    Fused mode's inputs are the same on every rank (momentum of the reduced gradient): replicated tensors under
    DDP, or FSDP2 ``DTensor`` shards, whose whole matrices are gathered first and whose directions are handed
    back as this rank's shard. Not for per-sub-batch mode, where each rank orthogonalises its own slots' momenta
    (its inputs differ from the other ranks', and it already does only its own share of the work).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, local: Orthogonalizer = orthogonalise) -> None:
        self.group = group
        self.local = local  # the orthogonalisation of this rank's share (batched Newton-Schulz)

    @torch.no_grad()
    def __call__(self, inputs: list[Tensor], steps: int, dtype: torch.dtype) -> list[Tensor]:
        from torch.distributed.tensor import DTensor, distribute_tensor

        full = [x.full_tensor() if isinstance(x, DTensor) else x for x in inputs]
        world = dist.get_world_size(self.group) if dist.is_available() and dist.is_initialized() else 1
        if world == 1:
            outputs = self.local(full, steps, dtype)
        else:
            owners = assign_owners([x.shape for x in full], world)
            rank = dist.get_rank(self.group)
            mine = [i for i, owner in enumerate(owners) if owner == rank]
            done = dict(zip(mine, self.local([full[i] for i in mine], steps, dtype))) if mine else {}
            outputs = self._exchange(full, owners, done, world, rank)
        return [distribute_tensor(out, x.device_mesh, x.placements, src_data_rank=None) if isinstance(x, DTensor)
                else out for out, x in zip(outputs, inputs)]

    def _exchange(self, full: list[Tensor], owners: list[int], done: dict[int, Tensor], world: int,
                  rank: int) -> list[Tensor]:
        """Every rank's directions to every rank: per (device, dtype), each rank packs its own into one flat
        buffer padded to the largest rank's size, and one all_gather moves them all."""
        outputs: list[Tensor | None] = [None] * len(full)
        buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, x in enumerate(full):
            buckets.setdefault((x.device, x.dtype), []).append(i)
        for (device, dtype), idx in buckets.items():
            per_rank = [[i for i in idx if owners[i] == r] for r in range(world)]
            sizes = [sum(full[i].numel() for i in ids) for ids in per_rank]
            width = max(sizes)
            if width == 0:
                continue
            local = torch.zeros(width, device=device, dtype=dtype)
            if per_rank[rank]:
                torch.cat([done[i].reshape(-1) for i in per_rank[rank]], out=local[:sizes[rank]])
            gathered = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(gathered, local, group=self.group)
            for r, ids in enumerate(per_rank):
                offset = 0
                for i in ids:
                    n = full[i].numel()
                    outputs[i] = gathered[r][offset:offset + n].view_as(full[i])
                    offset += n
        return outputs  # type: ignore[return-value]


def prepare_for_ranks(optimizer: BADM, world: int) -> None:
    """Give a BADM what it needs on ``world`` data-parallel ranks, once, where it is created: per-sub-batch mode
    the rank aggregation of its slots, fused mode the split Newton-Schulz work (when a group orthogonalises)."""
    if world <= 1:
        return
    if optimizer.mode == "per_sub_batch":
        if optimizer.aggregator is None:
            optimizer.aggregator = all_reduce_aggregator
    elif any(g["preconditioner"] == "newton_schulz" for g in optimizer.param_groups) and \
            not isinstance(optimizer.orthogonalizer, SplitOrthogonalizer):
        optimizer.orthogonalizer = SplitOrthogonalizer()


class ZeroMatrixLayout:
    """Where the matrices of one DeepSpeed ZeRO flat fp32 partition live, so that Newton-Schulz can act on whole
    matrices although BADM steps flat partitions (registered for it with ``register_matrix_layout``).

    ``gather(x)`` all-gathers a partition-shaped tensor (the Newton-Schulz input ``g + mu M`` of this rank's
    partition) and returns the whole matrices it is part of; ``scatter(matrices)`` returns this rank's partition of
    their directions (zeros in the padding). ZeRO-1/2 (``stage=2``): the ranks' partitions are consecutive slices of
    one flat buffer holding the matrices at ``offsets``. ZeRO-3 (``stage=3``): each matrix is partitioned on its own
    (``pieces[j]`` elements per rank, padded), and a rank's partition is its pieces of every matrix, concatenated."""

    def __init__(self, shapes: list[torch.Size], group: dist.ProcessGroup | None, *, stage: int,
                 offsets: list[int] | None = None, pieces: list[int] | None = None) -> None:
        self.shapes, self.group, self.stage = [torch.Size(s) for s in shapes], group, stage
        self.offsets, self.pieces = offsets, pieces
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def gather(self, x: Tensor) -> list[Tensor]:
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        if self.stage == 3:
            out, start = [], 0
            for shape, piece in zip(self.shapes, self.pieces):
                whole = torch.cat([p[start:start + piece] for p in parts])
                out.append(whole[:shape.numel()].view(shape))
                start += piece
            return out
        flat = torch.cat(parts)
        return [flat[o:o + s.numel()].view(s) for o, s in zip(self.offsets, self.shapes)]

    def scatter(self, matrices: list[Tensor], like: Tensor) -> Tensor:
        """This rank's partition of ``matrices`` (only its own elements are copied; zeros in the padding)."""
        out = torch.zeros_like(like)
        if self.stage == 3:
            start = 0
            for m, piece in zip(matrices, self.pieces):
                mine = m.reshape(-1)[self.rank * piece:(self.rank + 1) * piece]
                out[start:start + mine.numel()] = mine
                start += piece
            return out
        first = self.rank * like.numel()
        for m, o in zip(matrices, self.offsets):
            lo, hi = max(o, first), min(o + m.numel(), first + like.numel())
            if lo < hi:
                out[lo - first:hi - first] = m.reshape(-1)[lo - o:hi - o]
        return out


def attach_zero_layouts(zero_optimizer: Any) -> int:
    """Register the flat fp32 partitions of a DeepSpeed ZeRO optimizer whose BADM group orthogonalises (newton_schulz)
    with their :class:`ZeroMatrixLayout`; returns how many were registered. The BADM param groups of a newton_schulz
    optimizer made by ``badm_param_groups`` hold hidden weight matrices only, so every tensor of such a flat
    partition is a matrix."""
    badm = zero_optimizer.optimizer
    tagged = 0
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3: one flat partition per sub-group
        for sub, flat in enumerate(zero_optimizer.fp32_partitioned_groups_flat):
            group = badm.param_groups[zero_optimizer.sub_group_to_group_id[sub]]
            if group["preconditioner"] == "newton_schulz":
                params = zero_optimizer.fp16_groups[sub]
                register_matrix_layout(flat, ZeroMatrixLayout(
                    [p.ds_shape for p in params], zero_optimizer.sub_group_process_groups[sub], stage=3,
                    pieces=[p.partition_numel() for p in params]))
                tagged += 1
        return tagged
    for i, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups):  # ZeRO-1/2
        if badm.param_groups[i]["preconditioner"] == "newton_schulz":
            register_matrix_layout(flat, ZeroMatrixLayout(
                [m.shape for m in zero_optimizer.round_robin_bit16_meta[i]], zero_optimizer.real_dp_process_group[i],
                stage=2, offsets=list(zero_optimizer.round_robin_bit16_offsets[i])))
            tagged += 1
    return tagged
