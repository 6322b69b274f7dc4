"""The whole shape of a parameter, whatever engine holds it: the rule that decides what Newton-Schulz acts on reads
this, never the partition a process happens to hold."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["full_shape"]


def full_shape(p: Tensor) -> torch.Size:
    """DeepSpeed ZeRO-3 (``zero.Init``) keeps a 1-D placeholder with the real shape in ``ds_shape``; an FSDP2
    DTensor's ``shape`` is already the global one; any other tensor is whole."""
    shape = getattr(p, "ds_shape", None)
    return torch.Size(shape) if shape is not None else p.shape
