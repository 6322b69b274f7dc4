"""The local solve as a strategy: a preconditioner added as one class with a setting of its own (registered here,
nothing else touched, no module constant) trains in both modes and equals its literal reference; every built-in
solve's foreach path equals its single-tensor path bitwise."""

from __future__ import annotations

import io

import pytest
import torch

from hf_badm import BADM
from hf_badm.optim.local_solve import LOCAL_SOLVES, LocalSolve, register_local_solve
from reference import LiteralBADM
from hf_badm.optim.validation import fraction
from test_optimizer import SUBS, literal_grads, make_net, max_rel, mse, run_steps, sub_batches


@pytest.fixture
def sign_of_average():
    """A toy preconditioner: the direction is the sign of an EMA of the gradient (state of its own), the EMA's rate
    its own setting (default, validation, and its default rho/sigma, all in the class)."""

    @register_local_solve
    class SignOfAverage(LocalSolve):
        name = "sign_of_average"
        state_keys = ("average",)
        settings = {"sign_beta": 0.5}
        rho_over_sigma = 1.5

        @classmethod
        def check_settings(cls, group):
            if "sign_beta" in group:
                fraction("sign_beta", group["sign_beta"])

        def new_state(self, p):
            return {"average": torch.zeros_like(p)}

        def directions(self, grads, states, group, foreach):
            for s, g in zip(states, grads):
                s["average"].lerp_(g, 1.0 - group["sign_beta"])
            return [s["average"].sign() for s in states], None

    yield SignOfAverage.name
    del LOCAL_SOLVES[SignOfAverage.name]


def literal_sign_of_average(mode: str, sigma: float, rho: float, steps: int, beta: float = 0.5) -> list[torch.Tensor]:
    """docs/algorithm.md §2's slots with d_s = sign(EMA of g_s) per slot (per_sub_batch) or of the mean gradient (fused)."""
    net = make_net()
    params = list(net.parameters())
    ref = LiteralBADM(params, sigma, rho)
    averages = [[torch.zeros_like(p) for p in params] for _ in range(SUBS if mode == "per_sub_batch" else 1)]
    for t in range(steps):
        grads = literal_grads(net, ref, sub_batches(t))
        if mode == "fused":
            grads = [[sum(g[i] for g in grads) / SUBS for i in range(len(params))]]
        averages = [[beta * a + (1 - beta) * g for a, g in zip(avg, gs)] for avg, gs in zip(averages, grads)]
        ds = [[a.sign() for a in avg] for avg in averages]
        ref.step(ds if mode == "per_sub_batch" else ds * SUBS, [1.0] * SUBS)
    return ref.w


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_a_registered_toy_preconditioner_trains_and_equals_its_reference(sign_of_average, mode):
    sigma, rho = 20.0, 30.0
    net = make_net()
    opt = BADM(net.parameters(), sigma=sigma, rho=rho, mode=mode, preconditioner=sign_of_average)
    x, y = sub_batches(99)[0]
    before = float(mse(net, x, y).detach())
    run_steps(net, opt, 12, mode=mode)
    assert max_rel(list(net.parameters()), literal_sign_of_average(mode, sigma, rho, 12)) <= 1e-10
    assert float(mse(net, x, y).detach()) < before
    buf = io.BytesIO()  # its state round-trips with the optimizer's
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = BADM(make_net(seed=1).parameters(), mode=mode, preconditioner=sign_of_average)
    opt2.load_state_dict(torch.load(buf, weights_only=True))

    def averages(o):  # one tensor per parameter (fused) or per parameter and slot (per_sub_batch)
        return [a for s in o.state.values() for a in (s["average"] if mode == "per_sub_batch" else [s["average"]])]

    assert len(averages(opt)) == len(averages(opt2)) > 0
    assert all(torch.equal(a, b) for a, b in zip(averages(opt), averages(opt2)))


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_a_toy_solve_owns_its_setting_and_default_rho(sign_of_average, mode):
    """Its setting lands in every group (default, or BADM's ``solve_settings=``, where a solve registered after BADM's
    keywords were written gives its own), a group may override it, a bad value is refused by the solve's own check,
    and rho defaults to the solve's rho/sigma."""
    net = make_net()
    opt = BADM(net.parameters(), sigma=20.0, mode=mode, preconditioner=sign_of_average,
               solve_settings={"sign_beta": 0.8})
    assert opt.param_groups[0]["sign_beta"] == 0.8 and opt.param_groups[0]["rho"] == 30.0
    assert BADM(make_net().parameters(), preconditioner=sign_of_average).param_groups[0]["sign_beta"] == 0.5
    run_steps(net, opt, 12, mode=mode)
    assert max_rel(list(net.parameters()), literal_sign_of_average(mode, 20.0, 30.0, 12, beta=0.8)) <= 1e-10
    with pytest.raises(ValueError, match="sign_beta"):
        BADM(make_net().parameters(), preconditioner=sign_of_average, solve_settings={"sign_beta": 1.5})
    with pytest.raises(ValueError, match="sign_beta"):
        BADM([{"params": list(make_net().parameters()), "sign_beta": -0.1}], preconditioner=sign_of_average)
    with pytest.raises(TypeError, match="no_such_setting"):
        BADM(make_net().parameters(), no_such_setting=1.0)
    with pytest.raises(TypeError, match="no registered local solve has"):
        BADM(make_net().parameters(), solve_settings={"no_such_setting": 1.0})


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
@pytest.mark.parametrize("preconditioner", ["none", "second_moment", "normalized", "newton_schulz"])
@pytest.mark.parametrize("rho", [20.0, 30.0])
def test_foreach_equals_single_tensor_for_every_solve(preconditioner, mode, rho):
    nets = [make_net(), make_net()]
    opts = [BADM(n.parameters(), sigma=30.0, rho=rho, weight_decay=0.05, mode=mode, preconditioner=preconditioner,
                 foreach=f) for n, f in zip(nets, (True, False))]
    for net, opt in zip(nets, opts):
        run_steps(net, opt, 6, mode=mode)
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))
