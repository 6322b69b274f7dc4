"""What BADM.load_state_dict takes: earlier releases' keys read, then everything checked before anything
is replaced (all or nothing), with a message naming what does not fit. Floating-point state of another
dtype or device fits: torch's ``Optimizer.load_state_dict`` casts it to its parameter's, as for any optimizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hf_badm.optim.local_solve import LocalSolve, keeps_dual, local_solve_for
from hf_badm.optim.validation import all_finite, check_hyper_parameters, non_negative, positive

__all__ = ["checked_state_dict", "checked_badm_entry"]

# State keys of the release before the local solves had their own files, and their names now.
LEGACY_KEYS = {"fused": {"ns_momentum": "momentum_buffer"},
               "per_sub_batch": {"slot_sq": "exp_avg_sq", "slot_steps": "steps", "slot_ns": "momentum_buffer"}}
CORE_KEYS = ("sigma", "rho", "lr", "weight_decay", "preconditioner")  # every release's groups have them
BADM_ENTRY = ("mode", "step_weights", "slot_weights", "skipped_steps", "skipped_sub_batches", "sub_batches_last_step")


class _Misfit(ValueError):
    pass


def checked_state_dict(state_dict: Any, mode: str, groups: list[dict[str, Any]]) -> dict[str, Any]:
    """``state_dict`` in this release's form (a new dict; the input is not modified), checked against the
    optimizer's ``mode`` and param ``groups``. Raises ValueError naming the first thing that does not fit."""
    try:
        return _checked(state_dict, mode, groups)
    except _Misfit as e:
        raise ValueError(f"BADM.load_state_dict: {e}; nothing was loaded") from None


def checked_badm_entry(extra: Any, mode: str) -> dict[str, Any]:
    """A state dict's ``badm`` entry (mode, slot weights, counters) checked against the optimizer's ``mode``, for a
    caller that carries it apart from torch's state dict (torch's distributed ``get_state_dict`` drops it)."""
    try:
        _check_badm_entry(extra, mode)
    except _Misfit as e:
        raise ValueError(f"BADM.load_state_dict: {e}; nothing was loaded") from None
    return extra


def _checked(sd: Any, mode: str, groups: list[dict[str, Any]]) -> dict[str, Any]:
    if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict) or not isinstance(sd.get("param_groups"), list):
        raise _Misfit("expected a dict with 'state' (a dict) and 'param_groups' (a list)")
    extra = sd.get("badm")
    per_slot = any(isinstance(e, dict) and ("duals" in e or "aggregate" in e) for e in sd["state"].values())
    if extra is None and (mode == "per_sub_batch" or per_slot):
        raise _Misfit("the 'badm' entry (mode, slot weights) is missing: a per_sub_batch state needs it")
    if extra is not None:
        _check_badm_entry(extra, mode)
    saved_groups = sd["param_groups"]
    if len(saved_groups) != len(groups):
        raise _Misfit(f"the state has {len(saved_groups)} param groups, this optimizer {len(groups)}")
    params: dict[Any, tuple[int, dict[str, Any], Tensor]] = {}
    filled = []
    for i, (saved, group) in enumerate(zip(saved_groups, groups)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
            raise _Misfit(f"param group {i} is not a dict with a 'params' list")
        # a key added since the state was saved (``foreach``, a local solve's setting): the group's own value (its
        # current default, or what it was given), as torch's optimizers setdefault new flags; the core ones are checked
        saved = {**{k: v for k, v in group.items() if k not in CORE_KEYS}, **saved}
        filled.append(saved)
        if len(saved["params"]) != len(group["params"]):
            raise _Misfit(f"param group {i} has {len(saved['params'])} parameters in the state, {len(group['params'])} here")
        _check_group(i, saved)
        for index, p in zip(saved["params"], group["params"]):
            params[index] = (i, saved, p)
    renames = LEGACY_KEYS[mode]
    state = {}
    for index, entry in sd["state"].items():
        if index not in params:
            raise _Misfit(f"state for parameter {index!r}, which no param group lists")
        if not isinstance(entry, dict):
            raise _Misfit(f"the state of parameter {index!r} is not a dict")
        i, group, p = params[index]
        entry = {renames.get(k, k): v for k, v in entry.items()}
        where = f"parameter {index!r} (group {i}, shape {tuple(p.shape)})"
        if mode == "fused":
            state[index] = _checked_fused(entry, group, p, where)
        else:
            state[index] = _checked_slots(entry, group, p, where, len(extra["step_weights"]))
    return {**sd, "state": state, "param_groups": filled}


def _check_badm_entry(extra: Any, mode: str) -> None:
    if not isinstance(extra, dict) or any(k not in extra for k in BADM_ENTRY):
        missing = [k for k in BADM_ENTRY if not isinstance(extra, dict) or k not in extra]
        raise _Misfit(f"the 'badm' entry lacks {missing}")
    if extra["mode"] != mode:
        raise _Misfit(f"the state was saved in mode={extra['mode']!r} but this optimizer has mode={mode!r}")
    for name in ("step_weights", "slot_weights"):
        weights = extra[name]
        if not isinstance(weights, list):
            raise _Misfit(f"badm.{name} must be a list of numbers >= 0, got {weights!r}")
        for w in weights:
            _call(non_negative, f"badm.{name}", w)
    if mode == "fused" and (extra["step_weights"] or extra["slot_weights"]):
        raise _Misfit("badm.step_weights and badm.slot_weights must be empty in fused mode")
    for name in ("skipped_steps", "skipped_sub_batches", "sub_batches_last_step"):
        _check_count(f"badm.{name}", extra[name])


def _check_group(i: int, group: dict[str, Any]) -> None:
    missing = [name for name in CORE_KEYS if name not in group]
    if missing:
        raise _Misfit(f"param group {i} has no {missing[0]!r}")
    for name, check in (("sigma", positive), ("rho", positive), ("lr", non_negative), ("weight_decay", non_negative)):
        value = group[name]
        _call(check, f"param group {i}: {name}", value.item() if isinstance(value, Tensor) and value.numel() == 1
              else value)
    try:
        check_hyper_parameters(group)
    except ValueError as e:
        raise _Misfit(f"param group {i}: {e}") from None


def _checked_fused(entry: dict[str, Any], group: dict[str, Any], p: Tensor, where: str) -> dict[str, Any]:
    solve = local_solve_for(group, p)
    if not keeps_dual(group, solve):
        entry.pop("momentum", None)  # an earlier release kept it at rho = sigma, where it does not act
    expected = set(solve.state_keys) | ({"momentum"} if keeps_dual(group, solve) else set())
    if entry and set(entry) != expected:
        raise _Misfit(f"{where} with preconditioner {solve.name!r} in fused mode has state keys {sorted(entry)}, "
                      f"expected {sorted(expected)}")
    for key, value in entry.items():
        _check_value(f"{where}: {key!r}", value, p, _shape(solve, key, p))
    return entry


def _checked_slots(entry: dict[str, Any], group: dict[str, Any], p: Tensor, where: str, running: int) -> dict[str, Any]:
    solve = local_solve_for(group, p)
    if not entry:
        return entry
    if set(entry) - {"duals", "aggregate"} - set(solve.state_keys) or "duals" not in entry or "aggregate" not in entry:
        raise _Misfit(f"{where} with preconditioner {solve.name!r} in per_sub_batch mode has state keys {sorted(entry)}, "
                      f"expected 'duals', 'aggregate' and {list(solve.state_keys)}")
    _check_tensor(f"{where}: 'aggregate'", entry["aggregate"], p)
    duals = entry["duals"]
    if not isinstance(duals, list) or len(duals) < running:
        raise _Misfit(f"{where}: 'duals' must be a list of at least {running} tensors (the slots of the running step)")
    for s, d in enumerate(duals):
        _check_tensor(f"{where}: 'duals'[{s}]", d, p)
    for key in solve.state_keys:
        slots = entry.get(key, [] if not duals else None)  # a slot's solve state is created with its dual
        if not isinstance(slots, list) or len(slots) != len(duals):
            raise _Misfit(f"{where}: {key!r} must be a list of {len(duals)} entries, one per slot")
        for s, value in enumerate(slots):
            _check_value(f"{where}: {key!r}[{s}]", value, p, solve.state_shape(key, p))
    return entry


def _shape(solve: LocalSolve, key: str, p: Tensor) -> torch.Size:
    """The shape of state ``key`` of ``p``: the solve's for its own keys, the parameter's for BADM's dual."""
    return solve.state_shape(key, p) if key in solve.state_keys else p.shape


def _check_value(what: str, value: Any, p: Tensor, shape: torch.Size) -> None:
    """A local solve's state value: a tensor of the solve's shape for it (the parameter's, mostly), or a count."""
    if isinstance(value, Tensor):
        _check_tensor(what, value, p, shape)
    elif isinstance(value, int) and not isinstance(value, bool):
        _check_count(what, value)
    else:
        raise _Misfit(f"{what} must be a tensor like the parameter (or a count), got {value!r}")


def _check_tensor(what: str, t: Any, p: Tensor, shape: torch.Size | None = None) -> None:
    if not isinstance(t, Tensor):
        raise _Misfit(f"{what} must be a tensor, got {type(t).__name__}")
    shape = p.shape if shape is None else shape
    if t.shape != shape:
        raise _Misfit(f"{what} has shape {tuple(t.shape)}, expected {tuple(shape)} (the parameter's: {tuple(p.shape)})")
    if t.dtype != p.dtype and not (t.is_floating_point() and p.is_floating_point()):
        raise _Misfit(f"{what} has dtype {t.dtype}, the parameter {p.dtype}")
    # floating-point state is cast to the parameter's dtype (and device) on load, as torch's optimizers do: it
    # must still be finite after that cast (float32 beyond float16's range would not be)
    if not all_finite([t if t.dtype == p.dtype else t.to(p.dtype)]):
        raise _Misfit(f"{what} holds NaN or Inf" + ("" if t.dtype == p.dtype else f" as {p.dtype}"))


def _check_count(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Misfit(f"{what} must be an integer >= 0, got {value!r}")


def _call(check, what: str, value: Any) -> None:
    try:
        check(what, value)
    except ValueError as e:
        raise _Misfit(str(e)) from None
