"""BADM against the literal algorithm, and its contracts: state, bad input, non-finite gradients."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

from hf_badm import BADM
from hf_badm.optim import NonFiniteGradientError
from reference import LiteralBADM

STEPS, SUBS = 24, 4


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def sub_batches(step: int, sizes=(5, 5, 5, 5)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64))
            for n in sizes]


def grads_at(net: nn.Module, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    names = [n for n, _ in net.named_parameters()]
    out = torch.func.functional_call(net, dict(zip(names, params)), (x,))
    return list(torch.autograd.grad(((out - y) ** 2).mean(), params))


def literal_grads(net, ref, batches):
    return [grads_at(net, [w.requires_grad_() for w in ref.w], x, y) for x, y in batches]


def max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.detach() - y.detach()).abs().max() / y.detach().abs().max().clamp_min(1e-300)) for x, y in zip(a, b))


def mse(net, x, y):
    return ((net(x) - y) ** 2).mean()


def optimizer_step(net, opt, batches, sizes, mode: str) -> None:
    """One step of ``opt``: fused on the items-weighted mean loss, per-sub-batch one absorb per sub-batch."""
    opt.zero_grad()
    if mode == "fused":
        sum(n * mse(net, x, y) for (x, y), n in zip(batches, sizes)).div(sum(sizes)).backward()
    else:
        for (x, y), n in zip(batches, sizes):
            mse(net, x, y).backward()
            opt.absorb_sub_batch(n)
    opt.step()


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("schedule", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_matches_literal_algorithm(foreach, schedule, weight_decay):
    net = make_net()
    sigma, rho = 3.0, 4.5
    ref = LiteralBADM(list(net.parameters()), sigma, rho, weight_decay)
    opt = BADM(net.parameters(), sigma=sigma, rho=rho, weight_decay=weight_decay, foreach=foreach)
    factors = [1.0 if not schedule else 0.5 + 0.5 * math.cos(0.1 * t) ** 2 for t in range(STEPS + 1)]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: factors[t])
    for t in range(STEPS):
        batches = sub_batches(t)
        ref.step(literal_grads(net, ref, batches), [1.0] * SUBS, factor=factors[t])
        opt.zero_grad()
        sum(mse(net, x, y) for x, y in batches).div(SUBS).backward()  # the uniformly weighted mean gradient
        opt.step()
        sched.step()
    assert max_rel(list(net.parameters()), ref.w) <= 1e-10
    assert all(len(opt.state[p]) == 1 and opt.state[p]["momentum"].shape == p.shape for p in net.parameters())


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_per_sub_batch_matches_literal_with_changing_weights(foreach, weight_decay):
    net = make_net()
    sigma, rho = 2.0, 5.0
    ref = LiteralBADM(list(net.parameters()), sigma, rho, weight_decay)
    opt = BADM(net.parameters(), sigma=sigma, rho=rho, weight_decay=weight_decay, mode="per_sub_batch",
               foreach=foreach)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + 0.05 * t))
    for t in range(STEPS):
        sizes = [3 + (t + s) % 5 for s in range(SUBS)]  # unequal, changing every step
        batches = sub_batches(t, sizes)
        ref.step(literal_grads(net, ref, batches), [float(n) for n in sizes], factor=1.0 / (1 + 0.05 * t))
        for (x, y), n in zip(batches, sizes):
            mse(net, x, y).backward()
            opt.absorb_sub_batch(weight=n)
            assert all(p.grad is None for p in net.parameters())
        opt.step()
        sched.step()
    assert max_rel(list(net.parameters()), ref.w) <= 1e-10
    assert opt.sub_batches_last_step == SUBS


def test_modes_equal_each_other_with_uniform_weights():
    nets = [make_net(), make_net()]
    fused = BADM(nets[0].parameters(), sigma=3.0, rho=4.5)
    per = BADM(nets[1].parameters(), sigma=3.0, rho=4.5, mode="per_sub_batch")
    for t in range(STEPS):
        batches = sub_batches(t)
        fused.zero_grad()
        sum(mse(nets[0], x, y) for x, y in batches).div(SUBS).backward()
        fused.step()
        for x, y in batches:
            mse(nets[1], x, y).backward()
            per.absorb_sub_batch(1.0)
        per.step()
    assert max_rel(list(nets[1].parameters()), list(nets[0].parameters())) <= 1e-10


def run_steps(net, opt, steps, start=0, mode="fused"):
    for t in range(start, start + steps):
        batches = sub_batches(t)
        if mode == "fused":
            opt.zero_grad()
            sum(mse(net, x, y) for x, y in batches).div(SUBS).backward()
        else:
            for x, y in batches:
                mse(net, x, y).backward()
                opt.absorb_sub_batch(x.shape[0])
        opt.step()


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_foreach_equals_single_tensor_bitwise(mode):
    nets = [make_net(), make_net()]
    opts = [BADM(n.parameters(), sigma=2.0, rho=3.0, weight_decay=0.05, mode=mode, foreach=f)
            for n, f in zip(nets, (True, False))]
    for net, opt in zip(nets, opts):
        run_steps(net, opt, 10, mode=mode)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_state_round_trip_continues_bitwise(mode):
    net = make_net()
    opt = BADM(net.parameters(), sigma=2.0, rho=3.0, weight_decay=0.01, mode=mode)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + 0.1 * t))
    for t in range(6):
        run_steps(net, opt, 1, start=t, mode=mode)
        sched.step()
    if mode == "per_sub_batch":  # save in the middle of a step too: two sub-batches already absorbed
        for x, y in sub_batches(6)[:2]:
            mse(net, x, y).backward()
            opt.absorb_sub_batch(x.shape[0])
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)

    def finish(net, opt, sched):
        if mode == "per_sub_batch":
            for x, y in sub_batches(6)[2:]:
                mse(net, x, y).backward()
                opt.absorb_sub_batch(x.shape[0])
            opt.step()
            sched.step()
        for t in range(7, 14):
            run_steps(net, opt, 1, start=t, mode=mode)
            sched.step()

    finish(net, opt, sched)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    net2 = make_net(seed=5)
    net2.load_state_dict(saved["model"])
    opt2 = BADM(net2.parameters(), sigma=7.0, rho=1.0, mode=mode)  # hyper-parameters come from the state
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda t: 1.0 / (1 + 0.1 * t))
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    finish(net2, opt2, sched2)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)


def test_load_state_from_other_mode_is_rejected():
    net = make_net()
    opt = BADM(net.parameters())
    run_steps(net, opt, 1)
    with pytest.raises(ValueError, match="mode"):
        BADM(net.parameters(), mode="per_sub_batch").load_state_dict(opt.state_dict())


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(sigma=0.0), "sigma"), (dict(sigma=-1.0), "sigma"), (dict(sigma=float("nan")), "sigma"),
        (dict(sigma=float("inf")), "sigma"), (dict(sigma="3"), "sigma"), (dict(sigma=True), "sigma"),
        (dict(rho=0.0), "rho"), (dict(rho=-2.0), "rho"), (dict(rho=float("inf")), "rho"), (dict(rho=None, sigma=None, lr=0.0), "lr"),
        (dict(lr=-0.1), "lr"), (dict(lr=float("nan")), "lr"), (dict(sigma=2.0, lr=0.5), "sigma or lr"),
        (dict(weight_decay=-0.1), "weight_decay"), (dict(weight_decay=float("nan")), "weight_decay"),
        (dict(mode="literal"), "mode"), (dict(nonfinite="ignore"), "nonfinite"), (dict(foreach="yes"), "foreach"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BADM(make_net().parameters(), **kwargs)


@pytest.mark.parametrize(
    "group, name",
    [({"sigma": -1.0}, "sigma"), ({"rho": 0.0}, "rho"), ({"lr": float("inf")}, "lr"), ({"weight_decay": -1}, "weight_decay"),
     ({"sigma": 2.0, "lr": 0.1}, "lr means 1/sigma"), ({"foreach": 1}, "foreach")],
)
def test_invalid_param_group_overrides_raise(group, name):
    net = make_net()
    with pytest.raises(ValueError, match=name):
        BADM([{"params": list(net.parameters()), **group}])


def test_param_group_overrides_and_lr_spelling():
    net = make_net()
    params = list(net.parameters())
    opt = BADM([{"params": params[:2], "sigma": 4.0}, {"params": params[2:], "lr": 0.5, "rho": 9.0}], sigma=2.0, rho=3.0)
    g0, g1 = opt.param_groups
    assert (g0["sigma"], g0["lr"], g0["rho"]) == (4.0, 0.25, 6.0)  # rho keeps the optimizer's rho/sigma ratio
    assert (g1["sigma"], g1["lr"], g1["rho"]) == (2.0, 0.5, 9.0)
    assert BADM(params, lr=0.2).param_groups[0]["sigma"] == pytest.approx(5.0)


def test_rejects_complex_integer_and_sparse():
    with pytest.raises(ValueError, match="complex"):
        BADM([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(ValueError, match="floating-point"):
        BADM([torch.zeros(3, dtype=torch.int64)])
    emb = nn.Embedding(10, 4, sparse=True)
    opt = BADM(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


def test_mode_misuse_is_explained():
    net = make_net()
    with pytest.raises(RuntimeError, match="per_sub_batch"):
        BADM(net.parameters()).absorb_sub_batch(1.0)
    opt = BADM(net.parameters(), mode="per_sub_batch")
    mse(net, *sub_batches(0)[0]).backward()
    with pytest.raises(RuntimeError, match="absorb_sub_batch"):
        opt.step()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight"):
            opt.absorb_sub_batch(bad)


def test_zero_weight_sum_is_rejected():
    net = make_net()
    opt = BADM(net.parameters(), mode="per_sub_batch")
    mse(net, *sub_batches(0)[0]).backward()
    opt.absorb_sub_batch(0.0)
    with pytest.raises(ValueError, match="sum to > 0"):
        opt.step()


def snapshot(net, opt):
    return [p.detach().clone() for p in net.parameters()], copy.deepcopy(opt.state_dict())


def assert_unchanged(before, net, opt):
    params, state = before
    assert all(torch.equal(a, b) for a, b in zip(params, net.parameters()))
    now = opt.state_dict()
    for k, v in state["state"].items():
        for name, t in v.items():
            ts = t if isinstance(t, list) else [t]
            assert all(torch.equal(a, b) for a, b in zip(ts, now["state"][k][name] if isinstance(t, list) else [now["state"][k][name]]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_fused_step_leaves_everything_untouched(bad):
    net = make_net()
    opt = BADM(net.parameters())
    run_steps(net, opt, 3)
    before = snapshot(net, opt)
    opt.zero_grad()
    mse(net, *sub_batches(3)[0]).backward()
    next(net.parameters()).grad[0, 0] = bad
    with pytest.warns(UserWarning, match="NaN or Inf"):
        opt.step()
    assert opt.skipped_steps == 1
    assert_unchanged(before, net, opt)
    with pytest.raises(NonFiniteGradientError):
        BADM(net.parameters(), nonfinite="raise").step()


def test_nonfinite_sub_batch_is_skipped_and_slot_untouched():
    net = make_net()
    opt = BADM(net.parameters(), mode="per_sub_batch")
    run_steps(net, opt, 2, mode="per_sub_batch")
    before = snapshot(net, opt)
    mse(net, *sub_batches(2)[0]).backward()
    list(net.parameters())[-1].grad[0] = float("nan")
    with pytest.warns(UserWarning, match="NaN or Inf"):
        assert opt.absorb_sub_batch(5.0) is False
    assert opt.skipped_sub_batches == 1
    assert all(p.grad is None for p in net.parameters())
    assert_unchanged(before, net, opt)
    # a step whose only sub-batch was skipped moves nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert opt.skipped_steps == 1
    assert_unchanged(before, net, opt)
    mse(net, *sub_batches(3)[0]).backward()
    next(net.parameters()).grad.fill_(float("inf"))
    with pytest.raises(NonFiniteGradientError):
        BADM(net.parameters(), mode="per_sub_batch", nonfinite="raise").absorb_sub_batch(1.0)


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_missing_gradient_is_zero_gradient(mode):
    """A parameter with no history stays put; one with history keeps moving as the literal algorithm says."""
    net = make_net()
    extra = nn.Parameter(torch.randn(4, dtype=torch.float64))  # never receives a gradient
    params = list(net.parameters())
    ref = LiteralBADM(params, 2.0, 3.0)
    opt = BADM(params + [extra], sigma=2.0, rho=3.0, mode=mode)
    start = extra.detach().clone()
    for t in range(8):
        batches = sub_batches(t)
        frozen = t >= 4  # the last layer gets no gradient from step 4 on
        grads = literal_grads(net, ref, batches)
        if frozen:
            grads = [[torch.zeros_like(g) if i >= len(params) - 2 else g for i, g in enumerate(gs)] for gs in grads]
        ref.step(grads, [1.0] * SUBS)
        opt.zero_grad()
        if mode == "fused":
            sum(mse(net, x, y) for x, y in batches).div(SUBS).backward()
            if frozen:
                params[-1].grad = params[-2].grad = None
        else:
            for x, y in batches:
                mse(net, x, y).backward()
                if frozen:
                    params[-1].grad = params[-2].grad = None
                opt.absorb_sub_batch(1.0)
        opt.step()
    assert torch.equal(extra, start) and len(opt.state[extra]) == 0
    assert max_rel(params, ref.w) <= 1e-10


def test_metrics_report_penalties_and_dual_norm():
    net = make_net()
    opt = BADM(net.parameters(), sigma=2.0, rho=3.0)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5)
    run_steps(net, opt, 2)
    m = opt.metrics()
    assert m["badm_step_size"] == pytest.approx(0.25) and m["badm_beta"] == pytest.approx(0.6)
    norm = math.sqrt(sum(float(opt.state[p]["momentum"].norm()) ** 2 for p in net.parameters()))
    assert m["badm_dual_norm"] == pytest.approx(norm) and m["badm_sub_batches"] == 1.0


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_zero_schedule_factor_moves_duals_not_parameters(mode):
    """f_t = 0 (warm-up start) is the limit sigma_t, rho_t -> inf: w stays, the dual/momentum moves."""
    net = make_net()
    opt = BADM(net.parameters(), sigma=2.0, rho=3.0, weight_decay=0.1, mode=mode)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.0)
    before = [p.detach().clone() for p in net.parameters()]
    run_steps(net, opt, 2, mode=mode)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert opt.metrics()["badm_dual_norm"] > 0
