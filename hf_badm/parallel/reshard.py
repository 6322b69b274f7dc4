"""BADM's state under DeepSpeed ZeRO in a form that does not depend on the world size, so that a checkpoint resumes on
another number of ranks (or without an engine).

DeepSpeed's own ZeRO checkpoint holds each rank's flat partitions and loads only on the world size that wrote it; its
way out, the universal checkpoint, knows Adam's state keys only (``exp_avg``, ``exp_avg_sq``). So each rank also
writes ``badm_zero_rank{r}-of-{W}.pt``: for every parameter, by name, the elements ``[first, end)`` of the whole
flattened tensor it holds of every state key its local solve keeps, with the param groups' settings and BADM's
counters, and its elements of the fp32 master weights. The W files together are the whole state and weights per
parameter name (what a universal checkpoint holds, without gathering the model on one rank); any layout takes from them
the elements it holds. (DeepSpeed's module-only load is no way round: under ZeRO-3 a rank beyond the saved world size
finds no model-states file of its own.)
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hf_badm.optim.badm import BADM
from hf_badm.parallel.zero import ZeroPartition, zero_partitions

__all__ = ["ZERO_STATE_FILE", "ZERO_STATE_PATTERN", "save_zero_state", "load_zero_state", "zero_state_world",
           "zero_resume_problem", "whole_zero_state_dict", "saved_engine"]

ZERO_STATE_FILE = "badm_zero_rank{rank}-of-{world}.pt"
ZERO_STATE_PATTERN = re.compile(r"badm_zero_rank(\d+)-of-(\d+)\.pt$")
FORMAT = 1


def save_zero_state(zero_optimizer: Any, folder: str, rank: int, world: int, engine: dict[str, int]) -> None:
    """Write this rank's pieces of the fp32 weights and of BADM's state (and the groups' settings, BADM's counters,
    the ``engine``'s step counters) into ``folder``, whole or not at all (a temporary name renamed into place)."""
    badm: BADM = zero_optimizer.optimizer
    names = zero_optimizer.param_names
    tensors: dict[str, dict[str, Any]] = {}
    for part in zero_partitions(zero_optimizer):
        state = badm.state.get(part.flat, {})
        for p, shape, (first, end, start) in zip(part.params, part.shapes, part.layout().spans()):
            pieces = {key: value[start:start + end - first].clone() if isinstance(value, Tensor) else value
                      for key, value in state.items()}
            tensors[names[p]] = {"shape": list(shape), "group": part.group, "first": first, "end": end, "state": pieces,
                                 "weights": part.flat[start:start + end - first].detach().clone()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in badm.param_groups]
    payload = {"format": FORMAT, "world_size": world, "rank": rank, "tensors": tensors, "param_groups": groups,
               "badm": badm.badm_entry(), "engine": engine}
    path = os.path.join(folder, ZERO_STATE_FILE.format(rank=rank, world=world))
    torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)


def zero_state_world(checkpoint: str | Path) -> int | None:
    """The world size whose BADM ZeRO state files ``checkpoint`` holds (None: none); raises ValueError when they are
    not one world's complete set."""
    found = [m for p in Path(checkpoint).glob("badm_zero_rank*.pt") if (m := ZERO_STATE_PATTERN.search(p.name))]
    worlds = {int(m.group(2)) for m in found}
    if not worlds:
        return None
    if len(worlds) > 1:
        raise ValueError(f"{checkpoint} holds BADM ZeRO state files of several world sizes {sorted(worlds)}")
    (world,) = worlds
    missing = sorted(set(range(world)) - {int(m.group(1)) for m in found})
    if missing:
        raise ValueError(f"{Path(checkpoint) / ZERO_STATE_FILE.format(rank=missing[0], world=world)} is missing: "
                         "BADM's state of that rank's partition is lost")
    return world


def deepspeed_world(checkpoint: str | Path) -> int | None:
    """The data-parallel world size of the DeepSpeed checkpoint in ``checkpoint`` (the folder its ``latest`` names);
    None when it holds none."""
    latest = Path(checkpoint) / "latest"
    if not latest.is_file():
        return None
    ranks = {int(m.group(1)) for p in (Path(checkpoint) / latest.read_text().strip()).glob("*zero_pp_rank_*optim_states.pt")
             if (m := re.search(r"zero_pp_rank_(\d+)_", p.name))}
    return len(ranks) or None


# What Accelerate's FSDP saves (the Trainer's FSDP path: model and optimizer, whole or sharded per rank) and what a
# torch distributed checkpoint holds (hf_badm.parallel.dcp's, FSDP2 in a plain loop)
FSDP_FILES = ("pytorch_model_fsdp*", "optimizer.bin", "optimizer_[0-9]*", ".metadata")
SAVED = {"deepspeed": "by DeepSpeed ZeRO", "fsdp": "by FSDP", None: "without an engine (one process or DDP)"}
UNDER = {"deepspeed": "under DeepSpeed ZeRO", "fsdp": "under FSDP", None: "without an engine"}


def saved_engine(checkpoint: str | Path) -> str | None:
    """The engine whose files ``checkpoint`` holds: "deepspeed" (its ``latest``), "fsdp" (:data:`FSDP_FILES`), or None
    (the Trainer's own ``optimizer.pt``: one process or DDP)."""
    folder = Path(checkpoint)
    if (folder / "latest").is_file():
        return "deepspeed"
    return "fsdp" if any(next(folder.glob(pattern), None) for pattern in FSDP_FILES) else None


def zero_resume_problem(checkpoint: str | Path, world_size: int, *, engine: str | None, mixed_precision: bool,
                        can_reshard: bool) -> str | None:
    """Why ``checkpoint`` cannot resume exactly on ``world_size`` ranks under ``engine`` ("deepspeed", "fsdp" or None),
    or None. A DeepSpeed checkpoint resumes on its own world size through DeepSpeed, on another one (or without the
    engine) through BADM's state files; nothing moves between FSDP and another engine (FSDP's state is sharded
    DTensors in its own files, ZeRO's flat partitions and optimizer.pt whole tensors: none loads the others' files).
    ``can_reshard``: the installed Trainer lets the re-partitioning load run (transformers 5's
    ``Trainer._prepare_for_training``)."""
    try:
        saved, badm_world = deepspeed_world(checkpoint), zero_state_world(checkpoint)
    except ValueError as err:
        return str(err)
    by = saved_engine(checkpoint)
    if (by != engine and "fsdp" in (by, engine)) or (by is None and engine == "deepspeed"):
        if by is None and not (Path(checkpoint) / "trainer_state.json").is_file():
            return None  # not a Trainer checkpoint: the Trainer says what is missing
        back = {"deepspeed": "under DeepSpeed (any world size) or without an engine" if badm_world
                else f"under DeepSpeed on {saved} ranks",
                "fsdp": "under FSDP", None: "without an engine"}[by]
        return (f"{checkpoint} was saved {SAVED[by]}: resuming it {UNDER[engine]} is not supported (each engine "
                f"loads only its own files); resume it {back}")
    if saved is None or engine == "deepspeed" and saved == world_size:
        return None
    where = f"on {world_size} rank{'s' if world_size > 1 else ''}" + ("" if engine else " without DeepSpeed")
    if badm_world is None:
        return (f"{checkpoint} was saved by DeepSpeed on {saved} ranks without BADM's world-size-free state "
                f"({ZERO_STATE_FILE.format(rank='R', world=saved)}, written since hf_badm resumes ZeRO at other world "
                f"sizes): it resumes under DeepSpeed on {saved} ranks only, not {where}")
    if badm_world != saved:
        return f"{checkpoint}: BADM's state files are of {badm_world} ranks, DeepSpeed's of {saved}: not one checkpoint"
    if engine and mixed_precision:
        return (f"{checkpoint}: resuming ZeRO on another world size is tested in float32 only, and bf16/fp16 keep "
                f"DeepSpeed state of their own (the loss scale): resume on {saved} ranks")
    if engine and not can_reshard:
        import transformers

        return (f"{checkpoint} was saved on {saved} ranks: resuming ZeRO on another world size needs "
                f"Trainer._prepare_for_training (transformers >= 5), which transformers {transformers.__version__} lacks; "
                f"resume on {saved} ranks")
    return None


def load_zero_state(zero_optimizer: Any, checkpoint: str) -> dict[str, int]:
    """The fp32 weights and BADM's state from the ZeRO state files of ``checkpoint`` (any world size) into this rank's
    partitions; returns the saving engine's step counters. BADM's state goes through ``BADM.load_state_dict``, checked
    before anything (weights included) is replaced."""
    badm: BADM = zero_optimizer.optimizer
    files = _read(checkpoint)
    pieces = _pieces(files)
    names = zero_optimizer.param_names
    parts = zero_partitions(zero_optimizer)
    state: dict[int, dict[str, Any]] = {}
    weights = []
    with _groups_listed(zero_optimizer):
        index = {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in badm.param_groups))}
        for part in parts:
            state[index[id(part.flat)]], flat = _partition_state(part, names, pieces)
            weights.append(flat)
        badm.load_state_dict(_state_dict(files[0], state, badm.state_dict()["param_groups"]))
    for part, flat in zip(parts, weights):
        part.flat.data.copy_(flat)
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):  # the module's (bit16) partitions from the fp32 ones
        for sub in range(len(parts)):
            zero_optimizer._reassign_or_swap_out_partitioned_parameters(sub)
    else:
        zero_optimizer.update_lp_params()
    return files[0]["engine"]


def whole_zero_state_dict(checkpoint: str, optimizer: BADM, names: dict[Tensor, str]) -> dict[str, Any]:
    """A state dict of ``optimizer`` (whole parameters, no engine: one process or DDP) from the ZeRO state files of
    ``checkpoint``; ``names`` maps each of its parameters to its name in the model."""
    files = _read(checkpoint)
    pieces = _pieces(files)
    template = optimizer.state_dict()["param_groups"]
    state = {}
    for i, p in enumerate(chain.from_iterable(g["params"] for g in optimizer.param_groups)):
        found = _named(pieces, names[p], p.numel())
        out: dict[str, Any] = {}
        for key, value in found[0]["state"].items():
            out[key] = _assemble(found, key, 0, p.numel(), value).view(p.shape) if isinstance(value, Tensor) else value
        if out:
            state[i] = out
    return _state_dict(files[0], state, template)


def _read(checkpoint: str) -> list[dict[str, Any]]:
    world = zero_state_world(checkpoint)
    if world is None:
        raise ValueError(f"{checkpoint} holds no BADM ZeRO state files")
    files = [torch.load(os.path.join(checkpoint, ZERO_STATE_FILE.format(rank=r, world=world)), map_location="cpu",
                        weights_only=True, mmap=True) for r in range(world)]
    if any(f.get("format") != FORMAT for f in files):
        raise ValueError(f"{checkpoint}: BADM ZeRO state files of another format than {FORMAT}")
    return files


def _pieces(files: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Every saved piece, by parameter name."""
    out: dict[str, list[dict[str, Any]]] = {}
    for f in files:
        for name, piece in f["tensors"].items():
            out.setdefault(name, []).append(piece)
    return out


def _named(pieces: dict[str, list[dict[str, Any]]], name: str, numel: int) -> list[dict[str, Any]]:
    """The pieces of parameter ``name``, checked to tile its ``numel`` elements with the same state keys."""
    found = pieces.get(name)
    if not found:
        raise ValueError(f"BADM's ZeRO state has no parameter {name!r} (a checkpoint of another model?)")
    held = sum(p["end"] - p["first"] for p in found)
    if torch.Size(found[0]["shape"]).numel() != numel or held != numel:
        raise ValueError(f"BADM's ZeRO state of {name!r} holds {held} elements of shape {tuple(found[0]['shape'])}, "
                         f"this parameter has {numel}")
    keys = {k for p in found if p["end"] > p["first"] for k in p["state"]}
    if any(p["end"] > p["first"] and set(p["state"]) != keys for p in found):
        raise ValueError(f"BADM's ZeRO state of {name!r}: its pieces keep different state keys")
    return [p for p in found if p["end"] > p["first"]]


def _assemble(found: list[dict[str, Any]], key: str | None, first: int, end: int, like: Tensor,
              out: Tensor | None = None) -> Tensor:
    """Elements ``[first, end)`` of state ``key`` (None: the fp32 weights) of a whole flattened tensor, from its saved
    pieces (into ``out``)."""
    out = torch.zeros(end - first, dtype=like.dtype) if out is None else out
    for p in found:
        a, b = max(first, p["first"]), min(end, p["end"])
        if a < b:
            saved = p["weights"] if key is None else p["state"][key]
            out[a - first:b - first].copy_(saved[a - p["first"]:b - p["first"]])
    return out


def _partition_state(part: ZeroPartition, names: dict[Tensor, str], pieces: dict[str, list[dict[str, Any]]]
                     ) -> tuple[dict[str, Any], Tensor]:
    """The state and the fp32 weights of one flat partition of the current layout, from the saved pieces."""
    state: dict[str, Any] = {}
    weights = torch.zeros(part.flat.numel(), dtype=part.flat.dtype)
    for p, shape, (first, end, start) in zip(part.params, part.shapes, part.layout().spans()):
        found = _named(pieces, names[p], shape.numel())
        _assemble(found, None, first, end, weights, weights[start:start + end - first])
        for key, value in found[0]["state"].items():
            if not isinstance(value, Tensor):
                state[key] = value
                continue
            buf = state.setdefault(key, torch.zeros(part.flat.numel(), dtype=value.dtype))
            _assemble(found, key, first, end, value, buf[start:start + end - first])
    return state, weights


def _state_dict(saved: dict[str, Any], state: dict[int, dict[str, Any]], groups: list[dict[str, Any]]) -> dict[str, Any]:
    if len(saved["param_groups"]) != len(groups):
        raise ValueError(f"BADM's ZeRO state has {len(saved['param_groups'])} param groups, this optimizer {len(groups)}")
    return {"state": state, "param_groups": [{**s, "params": g["params"]} for s, g in zip(saved["param_groups"], groups)],
            "badm": saved["badm"]}


@contextmanager
def _groups_listed(zero_optimizer: Any) -> Iterator[None]:
    """ZeRO-3 lists its flat partitions in BADM's param groups only around a step or a load: list them meanwhile."""
    stage3 = hasattr(zero_optimizer, "fp32_partitioned_groups_flat") and not any(
        g["params"] for g in zero_optimizer.optimizer.param_groups)
    if stage3:
        zero_optimizer._set_fp32_optimizer_param_groups()
    try:
        yield
    finally:
        if stage3:
            zero_optimizer._clear_fp32_optimizer_param_groups()
