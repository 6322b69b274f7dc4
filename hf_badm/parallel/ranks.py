"""BADM across data-parallel ranks: the per-sub-batch aggregation (one all-reduce of the slot aggregates per step)
and what a BADM needs on several ranks, installed once where it is created."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from hf_badm.optim.badm import BADM
from hf_badm.parallel.orthogonalise import ParallelOrthogonaliser

__all__ = ["all_reduce_aggregator", "world_size", "prepare_for_ranks"]


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


def prepare_for_ranks(optimizer: BADM, world: int, **orthogonaliser_kwargs) -> None:
    """Give a BADM what it needs on ``world`` data-parallel ranks, once, where it is created: per-sub-batch mode
    the rank aggregation of its slots, fused mode the split Newton-Schulz work (when a group orthogonalises).
    ``orthogonaliser_kwargs`` go to :class:`ParallelOrthogonaliser` (bucket size, communication dtype)."""
    if world <= 1:
        return
    if optimizer.mode == "per_sub_batch":
        if optimizer.aggregator is None:
            optimizer.aggregator = all_reduce_aggregator
    elif optimizer.orthogonalises and not isinstance(optimizer.orthogonaliser, ParallelOrthogonaliser):
        optimizer.orthogonaliser = ParallelOrthogonaliser(**orthogonaliser_kwargs)
