"""BADM with torch's distributed checkpoint (DCP): the state of an FSDP2-sharded (or plain) model and its BADM by
parameter name, as DTensors that DCP re-shards for another world size (or a plain model of one process).

torch's ``get_state_dict`` keys the optimizer state by parameter name but keeps only ``state`` and ``param_groups``:
BADM's own entry (mode, slot weights, skipped counts) travels beside them here."""

from __future__ import annotations

from typing import Any

from torch import nn

from hf_badm.optim.badm import BADM
from hf_badm.optim.state_dict import checked_badm_entry

__all__ = ["badm_state_dict", "load_badm_state_dict"]


def badm_state_dict(model: nn.Module, optimizer: BADM) -> dict[str, Any]:
    """``{"model", "optim", "badm"}`` for ``torch.distributed.checkpoint.save``, and the template that
    ``torch.distributed.checkpoint.load`` fills in place before :func:`load_badm_state_dict`."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, "badm": optimizer.badm_entry()}


def load_badm_state_dict(model: nn.Module, optimizer: BADM, state: dict[str, Any]) -> None:
    """Load what :func:`badm_state_dict` gave (as DCP loaded it, on any world size) into ``model`` and ``optimizer``;
    BADM's state goes through ``BADM.load_state_dict`` (everything checked first)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    extra = checked_badm_entry(state["badm"], optimizer.mode)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    optimizer.load_badm_entry(extra)
