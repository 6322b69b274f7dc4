"""Optimizer states written by earlier releases load, and continue the trajectory they were on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_badm import BADM
from data.make_legacy_states import CASES, continue_run
from test_optimizer import make_net, max_rel

LEGACY = torch.load(Path(__file__).parent / "data" / "legacy_states.pt", weights_only=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_of_the_previous_release_loads_and_continues(name):
    """Renamed keys are read; fused newton_schulz at rho = sigma drops the `momentum` it no longer keeps.
    Newton-Schulz runs in float32 (batched now): its cases agree to float32 rounding, the others to 1e-12."""
    mode, kwargs = CASES[name]
    saved = LEGACY[name]
    net = make_net(seed=7)
    net.load_state_dict(saved["model"])
    opt = BADM(net.parameters(), mode=mode, preconditioner=kwargs.get("preconditioner", "none"))
    opt.load_state_dict(saved["opt"])
    assert opt.param_groups[0]["sigma"] == kwargs["sigma"] and opt.param_groups[0]["rho"] == kwargs["rho"]
    if name == "fused-newton_schulz":
        assert all("momentum" not in opt.state[p] for p in net.parameters() if p.dim() == 2)
    continue_run(net, opt, mode)
    tol = 1e-6 if "newton_schulz" in name else 1e-12
    assert max_rel(list(net.parameters()), saved["after"]) <= tol
