"""Optimizer states: those written by earlier releases load and continue their trajectory; those that do not
fit the optimizer are refused before anything changes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from hf_badm import BADM
from data.make_legacy_states import CASES, continue_run
from test_optimizer import make_net, max_rel, mse, run_steps, sub_batches

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


def trained(mode: str, preconditioner: str, mid_step: bool = False) -> tuple[torch.nn.Module, BADM]:
    net = make_net()
    opt = BADM(net.parameters(), sigma=2.0, rho=3.0, mode=mode, preconditioner=preconditioner)
    run_steps(net, opt, 2, mode=mode)
    if mid_step:  # two sub-batches of step 2 absorbed
        for x, y in sub_batches(2)[:2]:
            mse(net, x, y).backward()
            opt.absorb_sub_batch(x.shape[0])
    return net, opt


def fused_state() -> dict:
    return copy.deepcopy(trained("fused", "normalized")[1].state_dict())


def slot_state() -> dict:
    return copy.deepcopy(trained("per_sub_batch", "second_moment", mid_step=True)[1].state_dict())


def edit(make, change):
    def build():
        sd = make()
        change(sd)
        return sd
    return build


def setitem(path, value):
    """Set sd[path[0]][path[1]]... = value."""
    def change(sd):
        target = sd
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


def delitem(path):
    def change(sd):
        target = sd
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return change


def poison(path, value=float("nan")):
    def change(sd):
        target = sd
        for key in path:
            target = target[key]
        target.view(-1)[0] = value
    return change


WRONG_SHAPE = torch.zeros(3, dtype=torch.float64)
BAD_STATES = {  # name: (mode of the loading optimizer, bad state, words the message must hold)
    "fused state into per_sub_batch": ("per_sub_batch", fused_state, "mode"),
    "per_sub_batch state without badm into fused": ("fused", edit(slot_state, delitem(["badm"])), "badm"),
    "per_sub_batch state without badm": ("per_sub_batch", edit(slot_state, delitem(["badm"])), "badm"),
    "badm without step_weights": ("per_sub_batch", edit(slot_state, delitem(["badm", "step_weights"])), "step_weights"),
    "badm mode unknown": ("per_sub_batch", edit(slot_state, setitem(["badm", "mode"], "literal")), "mode"),
    "step weight NaN": ("per_sub_batch", edit(slot_state, setitem(["badm", "step_weights"], [1.0, float("nan")])),
                        "step_weights"),
    "slot weight negative": ("per_sub_batch", edit(slot_state, setitem(["badm", "slot_weights"], [-1.0] * 4)),
                             "slot_weights"),
    "skipped_steps negative": ("per_sub_batch", edit(slot_state, setitem(["badm", "skipped_steps"], -1)),
                               "skipped_steps"),
    "step weights in fused mode": ("fused", edit(fused_state, setitem(["badm", "step_weights"], [1.0])), "step_weights"),
    "sigma negative": ("fused", edit(fused_state, setitem(["param_groups", 0, "sigma"], -1.0)), "sigma"),
    "sigma a string": ("fused", edit(fused_state, setitem(["param_groups", 0, "sigma"], "3")), "sigma"),
    "rho NaN": ("fused", edit(fused_state, setitem(["param_groups", 0, "rho"], float("nan"))), "rho"),
    "rho infinite": ("fused", edit(fused_state, setitem(["param_groups", 0, "rho"], float("inf"))), "rho"),
    "lr infinite": ("fused", edit(fused_state, setitem(["param_groups", 0, "lr"], float("inf"))), "lr"),
    "lr missing": ("fused", edit(fused_state, delitem(["param_groups", 0, "lr"])), "lr"),
    "weight_decay negative": ("fused", edit(fused_state, setitem(["param_groups", 0, "weight_decay"], -1.0)),
                              "weight_decay"),
    "preconditioner unknown": ("fused", edit(fused_state, setitem(["param_groups", 0, "preconditioner"], "bogus")),
                               "preconditioner"),
    "beta2 out of range": ("fused", edit(fused_state, setitem(["param_groups", 0, "beta2"], 1.5)), "beta2"),
    "ns_steps zero": ("fused", edit(fused_state, setitem(["param_groups", 0, "ns_steps"], 0)), "ns_steps"),
    "one group too many": ("fused", edit(fused_state, lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0]))),
                           "param groups"),
    "a parameter missing from the group": ("fused", edit(fused_state, lambda sd: sd["param_groups"][0]["params"].pop()),
                                           "parameters"),
    "state of an unknown parameter": ("fused", edit(fused_state, lambda sd: sd["state"].update({99: sd["state"][0]})),
                                      "99"),
    "momentum of the wrong shape": ("fused", edit(fused_state, setitem(["state", 0, "momentum"], WRONG_SHAPE)), "shape"),
    "second moment not floating-point": ("fused", edit(fused_state, lambda sd: sd["state"][1].update(
        exp_avg_sq=sd["state"][1]["exp_avg_sq"].long())), "dtype"),
    "momentum not a tensor": ("fused", edit(fused_state, setitem(["state", 0, "momentum"], [1.0])), "tensor"),
    "momentum holds NaN": ("fused", edit(fused_state, poison(["state", 2, "momentum"])), "NaN"),
    "second moment holds Inf": ("fused", edit(fused_state, poison(["state", 3, "exp_avg_sq"], float("inf"))), "NaN or Inf"),
    "steps negative": ("fused", edit(fused_state, setitem(["state", 0, "steps"], -2)), "steps"),
    "steps not an integer": ("fused", edit(fused_state, setitem(["state", 0, "steps"], 1.5)), "steps"),
    "second moment missing": ("fused", edit(fused_state, delitem(["state", 0, "exp_avg_sq"])), "exp_avg_sq"),
    "unknown state key": ("fused", edit(fused_state, setitem(["state", 0, "bogus"], WRONG_SHAPE)), "bogus"),
    "slot lists of different lengths": ("per_sub_batch", edit(slot_state, lambda sd: sd["state"][0]["exp_avg_sq"].pop()),
                                        "exp_avg_sq"),
    "aggregate of the wrong shape": ("per_sub_batch", edit(slot_state, setitem(["state", 1, "aggregate"], WRONG_SHAPE)),
                                     "aggregate"),
    "duals not a list": ("per_sub_batch", edit(slot_state, lambda sd: sd["state"][0].update(
        duals=sd["state"][0]["duals"][0])), "duals"),
    "fewer duals than absorbed sub-batches": ("per_sub_batch", edit(
        slot_state, setitem(["badm", "step_weights"], [1.0] * 5)), "duals"),
    "dual holds NaN": ("per_sub_batch", edit(slot_state, poison(["state", 4, "duals", 3])), "NaN"),
    "per-slot steps negative": ("per_sub_batch", edit(slot_state, setitem(["state", 5, "steps", 0], -1)), "steps"),
    "state is not a dict": ("fused", edit(fused_state, setitem(["state"], [])), "state"),
}


def snapshot(opt: BADM) -> dict:
    return copy.deepcopy({"sd": opt.state_dict(), "groups": [{k: v for k, v in g.items() if k != "params"}
                                                             for g in opt.param_groups]})


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


@pytest.mark.parametrize("name", sorted(BAD_STATES))
def test_a_state_that_does_not_fit_is_refused_and_changes_nothing(name):
    mode, build, words = BAD_STATES[name]
    _, opt = trained(mode, "normalized" if mode == "fused" else "second_moment", mid_step=mode == "per_sub_batch")
    before = snapshot(opt)
    with pytest.raises(ValueError, match=words):
        opt.load_state_dict(build())
    assert same(snapshot(opt), before)


@pytest.mark.parametrize("mode, preconditioner", [("fused", "normalized"), ("per_sub_batch", "second_moment"),
                                                  ("fused", "newton_schulz"), ("per_sub_batch", "newton_schulz")])
def test_a_state_of_this_release_loads_into_a_fresh_optimizer(mode, preconditioner):
    _, opt = trained(mode, preconditioner, mid_step=mode == "per_sub_batch")
    fresh = BADM(make_net(seed=2).parameters(), mode=mode, preconditioner=preconditioner)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert same(fresh.state_dict(), opt.state_dict())


@pytest.mark.parametrize("mode, preconditioner", [("fused", "normalized"), ("per_sub_batch", "second_moment")])
def test_floating_point_state_is_cast_to_the_parameters_dtype(mode, preconditioner):
    """As torch's optimizers load: a float64 state goes into a bfloat16 copy of the model, every floating-point
    tensor (the duals and slot lists included) cast to bfloat16; counts stay as they are; the copy then trains."""
    net, opt = trained(mode, preconditioner, mid_step=mode == "per_sub_batch")
    saved = copy.deepcopy(opt.state_dict())
    low = copy.deepcopy(net).to(torch.bfloat16)
    fresh = BADM(low.parameters(), mode=mode, preconditioner=preconditioner)
    fresh.load_state_dict(saved)
    loaded = fresh.state_dict()

    def cast(value):
        if isinstance(value, torch.Tensor):
            return value.to(torch.bfloat16) if value.is_floating_point() else value
        return [cast(v) for v in value] if isinstance(value, list) else value

    assert loaded["state"] and all(same(loaded["state"][i][k], cast(v))  # same(): equal values and dtypes
                                   for i, entry in saved["state"].items() for k, v in entry.items())
    if mode == "per_sub_batch":
        for x, y in sub_batches(2)[2:]:  # the rest of the step the state was saved in
            mse(low, x.bfloat16(), y.bfloat16()).backward()
            fresh.absorb_sub_batch(x.shape[0])
    else:
        x, y = sub_batches(3)[0]
        mse(low, x.bfloat16(), y.bfloat16()).backward()
    before = [p.detach().clone() for p in low.parameters()]
    fresh.step()
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(low.parameters(), before))


def test_a_state_beyond_the_parameters_dtype_is_refused():
    """Cast to float32, a float64 momentum of 1e300 would be Inf: refused like a NaN, nothing loaded."""
    net, opt = trained("fused", "normalized")
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["momentum"].fill_(1e300)
    fresh = BADM(copy.deepcopy(net).float().parameters(), mode="fused", preconditioner="normalized")
    with pytest.raises(ValueError, match="NaN or Inf as torch.float32"):
        fresh.load_state_dict(saved)
    assert not fresh.state

