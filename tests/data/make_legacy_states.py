"""Writes legacy_states.pt: BADM optimizer states as the release before the local-solve refactor
(commit 0349126) saved them, one per mode x preconditioner, with the parameters that release reached
3 steps later. tests/test_state_dict.py checks that the current BADM loads them and continues the same
trajectory. Written with that release's code on the path:
``git archive 0349126 hf_badm tests | tar -x -C OLD && cd OLD/tests && PYTHONPATH=OLD python data/make_legacy_states.py``."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from test_optimizer import make_net, mse, run_steps, sub_batches  # noqa: E402

from hf_badm import BADM  # noqa: E402

CASES = {  # name: (mode, BADM kwargs)
    f"{mode}-{name}": (mode, kwargs)
    for mode in ("fused", "per_sub_batch")
    for name, kwargs in (
        ("none", dict(sigma=3.0, rho=4.5, weight_decay=0.01)),
        ("second_moment", dict(sigma=1.0, rho=20.0, preconditioner="second_moment", beta2=0.9)),
        ("normalized", dict(sigma=100.0, rho=900.0, preconditioner="normalized")),
        ("newton_schulz", dict(sigma=30.0, rho=30.0, preconditioner="newton_schulz", weight_decay=0.01)),
        ("newton_schulz_qh", dict(sigma=30.0, rho=60.0, preconditioner="newton_schulz")),
    )
}


def absorb(net, opt, batches) -> None:
    for x, y in batches:
        mse(net, x, y).backward()
        opt.absorb_sub_batch(x.shape[0])


def continue_run(net, opt, mode: str) -> None:
    """From the saved point: per_sub_batch finishes step 3 (2 of its 4 sub-batches were absorbed), then 3 steps."""
    if mode == "per_sub_batch":
        absorb(net, opt, sub_batches(3)[2:])
        opt.step()
    run_steps(net, opt, 3, start=4, mode=mode)


def main() -> None:
    out = {}
    for name, (mode, kwargs) in CASES.items():
        net = make_net()
        opt = BADM(net.parameters(), mode=mode, **kwargs)
        run_steps(net, opt, 3, mode=mode)
        if mode == "per_sub_batch":
            absorb(net, opt, sub_batches(3)[:2])  # saved in the middle of a step
        saved = copy.deepcopy({"model": net.state_dict(), "opt": opt.state_dict()})  # before continuing
        continue_run(net, opt, mode)
        out[name] = {**saved, "after": [p.detach().clone() for p in net.parameters()]}
    torch.save(out, HERE / "legacy_states.pt")


if __name__ == "__main__":
    main()
