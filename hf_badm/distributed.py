"""BADM across data-parallel ranks: the per-sub-batch aggregation (one all-reduce of the slot aggregates per step)
and the Newton-Schulz work split of fused mode (each matrix orthogonalised on one rank, one all_gather)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from hf_badm.optim.badm import BADM, Orthogonalizer
from hf_badm.optim.preconditioned import orthogonalise

__all__ = ["all_reduce_aggregator", "world_size", "assign_owners", "SplitOrthogonalizer", "prepare_for_ranks"]


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
            outputs = self._exchange(full, owners, done, world)
        return [distribute_tensor(out, x.device_mesh, x.placements, src_data_rank=None) if isinstance(x, DTensor)
                else out for out, x in zip(outputs, inputs)]

    def _exchange(self, full: list[Tensor], owners: list[int], done: dict[int, Tensor], world: int) -> list[Tensor]:
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
            rank = dist.get_rank(self.group)
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
