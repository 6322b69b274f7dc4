"""The checks BADM applies to its arguments, its param groups and the states it loads."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from hf_badm.optim.local_solve import LOCAL_SOLVES, check_settings

__all__ = ["PENALTY_RANGE", "penalty", "positive", "non_negative", "fraction", "count", "one_of", "check_hyper_parameters", "all_finite"]


def positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


# BADM's penalties (sigma, rho) outside this range overflow or stall in float32 (sigma 1e-300 overflows at step 1;
# rho 1e308 never moves the weights); the tuned values lie between 1e-2 and 1e4.
PENALTY_RANGE = (1e-12, 1e12)


def penalty(name: str, value: Any) -> float:
    """A penalty of BADM's (sigma, rho and their elementwise forms): positive and within :data:`PENALTY_RANGE`."""
    value = positive(name, value)
    low, high = PENALTY_RANGE
    if not low <= value <= high:
        raise ValueError(f"{name}={value:g} is outside {low:g}..{high:g}: BADM would overflow or stop learning")
    return value


def non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def fraction(name: str, value: Any) -> None:
    """A rate in [0, 1) (an EMA's beta, a momentum)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def count(name: str, value: Any) -> None:
    """An integer >= 1 (iterations)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_hyper_parameters(group: dict[str, Any]) -> None:
    """What ``group`` holds beyond sigma, rho and lr: its preconditioner, ``strict``, ``foreach`` and the settings of
    the local solves (each solve checks its own)."""
    if "preconditioner" in group and group["preconditioner"] not in LOCAL_SOLVES:
        raise ValueError(f"preconditioner must be one of {tuple(LOCAL_SOLVES)}, got {group['preconditioner']!r}")
    check_settings(group)
    if not isinstance(group.get("strict", False), bool):
        raise ValueError(f"strict must be True or False, got {group['strict']!r}")
    if not (group.get("foreach") is None or isinstance(group["foreach"], bool)):
        raise ValueError(f"foreach must be True, False or None, got {group['foreach']!r}")


def all_finite(tensors: list[Tensor]) -> bool:
    """One reduction per device and a single host sync. Off CPU: max|x| (a fused multi-tensor inf-norm)
    is NaN/Inf iff some element is. On CPU that inf-norm is a scalar loop (about 8x a vectorised pass,
    more than the whole update), so there min and max of each tensor, one vectorised pass: NaN propagates
    into both and +-Inf shows in one of them. Empty tensors have no elements to check."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        if t.numel():
            by_device.setdefault(t.device, []).append(t)
    for device, ts in by_device.items():
        if device.type == "cpu":
            extremes = [x for t in ts for x in torch.aminmax(t)]
        else:
            extremes = torch._foreach_norm(ts, math.inf)
        if not bool(torch.stack(extremes).isfinite().all()):
            return False
    return True



