"""Preconditioned BADM (second_moment, normalized, newton_schulz): reductions to plain BADM, literal per-slot
form, the exact shared form, per-slot state, round-trip."""

from __future__ import annotations

import io

import pytest
import torch

from hf_badm import BADM
from hf_badm.optim.local_solve import LOCAL_SOLVES
from hf_badm.optim.solves.newton_schulz import orthogonalised
from hf_badm.optim.solves import Normalized, SecondMoment
from test_optimizer import STEPS, SUBS, literal_grads, make_net, max_rel, mse, run_steps, sub_batches
from reference import LiteralBADM


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_preconditioner_none_is_plain_badm_bitwise(mode):
    nets = [make_net(), make_net()]
    opts = [BADM(nets[0].parameters(), sigma=2.0, rho=3.0, mode=mode),
            BADM(nets[1].parameters(), sigma=2.0, rho=3.0, mode=mode, preconditioner="none")]
    for net, opt in zip(nets, opts):
        run_steps(net, opt, 8, mode=mode)
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))


def assert_same_trajectory_under_a_schedule(nets, opts, mode: str) -> None:
    scheds = [torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + 0.1 * t)) for opt in opts]
    for t in range(STEPS):
        for net, opt, sched in zip(nets, opts, scheds):
            run_steps(net, opt, 1, start=t, mode=mode)
            sched.step()
    assert max_rel(list(nets[0].parameters()), list(nets[1].parameters())) <= 1e-10


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_frozen_second_moment_is_plain_badm_with_rescaled_rho(mode, monkeypatch):
    """q = sqrt(v_hat) + eps frozen to a constant c: D = sigma + rho c, i.e. plain BADM with rho' = rho c."""
    c = 0.37

    class Frozen(SecondMoment):
        def directions(self, grads, states, group, foreach):
            ratio = group["rho"] / group["sigma"]
            return grads, [torch.full_like(g, 1.0 / (1.0 + ratio * c)) for g in grads]

    monkeypatch.setitem(LOCAL_SOLVES, "second_moment", Frozen())
    nets = [make_net(), make_net()]
    pre = BADM(nets[0].parameters(), sigma=2.0, rho=3.0, mode=mode, preconditioner="second_moment", weight_decay=0.05)
    plain = BADM(nets[1].parameters(), sigma=2.0, rho=3.0 * c, mode=mode, weight_decay=0.05)
    assert_same_trajectory_under_a_schedule(nets, (pre, plain), mode)


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_frozen_normalized_is_plain_badm_with_rescaled_penalties(mode, monkeypatch):
    """sqrt(v_hat) + eps frozen to c: plain BADM on g / c, i.e. plain BADM with sigma' = c sigma, rho' = c rho
    (its duals are c times the variant's)."""
    c = 0.37

    class Frozen(Normalized):
        def directions(self, grads, states, group, foreach):
            return [g / c for g in grads], None

    monkeypatch.setitem(LOCAL_SOLVES, "normalized", Frozen())
    nets = [make_net(), make_net()]
    pre = BADM(nets[0].parameters(), sigma=2.0, rho=3.0, mode=mode, preconditioner="normalized")
    plain = BADM(nets[1].parameters(), sigma=2.0 * c, rho=3.0 * c, mode=mode)
    assert_same_trajectory_under_a_schedule(nets, (pre, plain), mode)


def literal_preconditioned(kind: str, mode: str, steps: int = 12, sigma: float = 1.0, rho: float = 20.0,
                           beta2: float = 0.9, eps: float = 1e-8):
    """Literal slots with q = sqrt(v_hat) + eps, per slot v_s (PISA) or one shared v (fused):
    second_moment solves with D_s = sigma + rho q; normalized takes g_s / q as the gradient (D = sigma + rho)."""
    net = make_net()
    params = list(net.parameters())
    w = [p.detach().clone() for p in params]
    pis = [[torch.zeros_like(p) for p in params] for _ in range(SUBS)]
    vs = [[torch.zeros_like(p) for p in params] for _ in range(SUBS if mode == "per_sub_batch" else 1)]
    ref = LiteralBADM(params, sigma, rho)
    for t in range(steps):
        ref.w = w
        grads = literal_grads(net, ref, sub_batches(t))
        if mode == "fused":
            mean = [sum(g[i] for g in grads) / SUBS for i in range(len(params))]
            vs[0] = [beta2 * v + (1 - beta2) * m * m for v, m in zip(vs[0], mean)]
        w = [x.detach() for x in w]
        new_w = [torch.zeros_like(x) for x in w]
        for s in range(SUBS):
            if mode == "per_sub_batch":
                vs[s] = [beta2 * v + (1 - beta2) * g * g for v, g in zip(vs[s], grads[s])]
            v = vs[s if mode == "per_sub_batch" else 0]
            for i in range(len(params)):
                q = (v[i] / (1 - beta2 ** (t + 1))).sqrt() + eps
                if kind == "second_moment":
                    ws = w[i] - (grads[s][i] + pis[s][i]) / (sigma + rho * q)
                else:
                    ws = w[i] - (grads[s][i] / q + pis[s][i]) / (sigma + rho)
                pis[s][i] = pis[s][i] + sigma * (ws - w[i])
                new_w[i] += (ws + pis[s][i] / sigma) / SUBS
        w = [x.detach() for x in new_w]
    return w


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
@pytest.mark.parametrize("kind", ["second_moment", "normalized"])
def test_elementwise_variants_equal_literal_preconditioned_slots(kind, mode):
    expected = literal_preconditioned(kind, mode)
    for foreach in (False, True):
        net = make_net()
        opt = BADM(net.parameters(), sigma=1.0, rho=20.0, mode=mode, preconditioner=kind, beta2=0.9, foreach=foreach)
        run_steps(net, opt, 12, mode=mode)
        assert max_rel(list(net.parameters()), expected) <= 1e-10, foreach


def test_per_slot_preconditioner_state_is_per_slot():
    net = make_net()
    opt = BADM(net.parameters(), sigma=1.0, rho=20.0, mode="per_sub_batch", preconditioner="second_moment", beta2=0.9)
    run_steps(net, opt, 1, mode="per_sub_batch")
    p = next(net.parameters())
    state = opt.state[p]
    assert len(state["duals"]) == len(state["exp_avg_sq"]) == SUBS and state["steps"] == [1] * SUBS
    assert not torch.equal(state["exp_avg_sq"][0], state["exp_avg_sq"][1])


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
@pytest.mark.parametrize("preconditioner", ["second_moment", "normalized", "newton_schulz"])
def test_preconditioned_state_round_trip_is_bitwise(mode, preconditioner):
    net = make_net()
    opt = BADM(net.parameters(), sigma=1.0, rho=20.0, mode=mode, preconditioner=preconditioner)
    run_steps(net, opt, 4, mode=mode)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    run_steps(net, opt, 4, start=4, mode=mode)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    net2 = make_net(seed=3)
    net2.load_state_dict(saved["model"])
    opt2 = BADM(net2.parameters(), mode=mode, preconditioner=preconditioner)
    opt2.load_state_dict(saved["opt"])
    run_steps(net2, opt2, 4, start=4, mode=mode)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_newton_schulz_uses_orthogonalised_momentum_on_matrices_only(mode):
    net = make_net()
    opt = BADM(net.parameters(), sigma=30.0, rho=30.0, mode=mode, preconditioner="newton_schulz")
    run_steps(net, opt, 3, mode=mode)
    for p in net.parameters():
        state = opt.state[p]
        key = "momentum_buffer" if p.dim() == 2 else "exp_avg_sq"
        assert key in state and (mode == "fused") != isinstance(state[key], list), (p.shape, sorted(state))
    x = torch.randn(16, 6, dtype=torch.float64)
    s = torch.linalg.svdvals(orthogonalised(x) / (16 / 6) ** 0.5)
    assert float(s.min()) > 0.5 and float(s.max()) < 1.3


@pytest.mark.parametrize("kwargs, name", [(dict(preconditioner="lamb"), "preconditioner"),
                                          (dict(beta2=1.0), "beta2"), (dict(beta2=-0.1), "beta2"),
                                          (dict(eps=0.0), "eps"), (dict(ns_momentum=1.0), "ns_momentum"),
                                          (dict(ns_steps=0), "ns_steps")])
def test_invalid_preconditioner_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BADM(make_net().parameters(), **kwargs)


@pytest.mark.parametrize("preconditioner, lr, rho", [("second_moment", 1.0, 1000.0), ("normalized", 3e-3, None),
                                                     ("newton_schulz", 1 / 30, None)])
@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_preconditioned_badm_trains_in_the_trainer(tmp_path, preconditioner, lr, rho, mode):
    from hf_badm import BADMConfig, BADMTrainer
    from tiny import assert_loss_falls, chain_dataset, tiny_args, tiny_model

    model = tiny_model("llama")
    config = BADMConfig(mode=mode, preconditioner=preconditioner, rho=rho)
    trainer = BADMTrainer(model=model, args=tiny_args(tmp_path, learning_rate=lr, gradient_accumulation_steps=2),
                          train_dataset=chain_dataset(), badm_config=config)
    trainer.train()
    assert_loss_falls(trainer)
    groups = trainer.badm_optimizer.param_groups
    embed = model.get_input_embeddings().weight
    owner = next(g for g in groups if any(p is embed for p in g["params"]))
    if preconditioner != "newton_schulz":
        assert owner["preconditioner"] == preconditioner
    else:  # the elementwise defaults
        assert (owner["preconditioner"], owner["sigma"], owner["rho"]) == ("normalized", 10.0, 90.0)
        q_proj = model.model.layers[0].self_attn.q_proj.weight
        assert next(g for g in groups if any(p is q_proj for p in g["params"]))["preconditioner"] == "newton_schulz"


def test_newton_schulz_with_second_moment_elementwise_tensors(tmp_path):
    from hf_badm import BADMConfig, create_badm_optimizer
    from tiny import tiny_args, tiny_model

    model = tiny_model("gpt2")
    config = BADMConfig(preconditioner="newton_schulz", elementwise_preconditioner="second_moment")
    opt, _ = create_badm_optimizer(model, tiny_args(tmp_path, learning_rate=1 / 30), badm_config=config)
    embed = model.get_input_embeddings().weight
    owner = next(g for g in opt.param_groups if any(p is embed for p in g["params"]))
    assert (owner["preconditioner"], owner["sigma"], owner["rho"]) == ("second_moment", 0.1, 600.0)
    assert opt.param_groups[0]["rho"] == pytest.approx(30.0)  # newton_schulz: rho = sigma by default
    with pytest.raises(ValueError, match="elementwise_preconditioner"):
        BADMConfig(elementwise_preconditioner="newton_schulz")


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_metrics_are_reported_per_local_solve_by_role(mode):
    """A newton_schulz optimizer with a normalized group: the plain names belong to newton_schulz (the optimizer's own
    solve), the other solve's carry its name, whatever the groups' order; fused at rho = sigma the matrices keep no
    dual (Muon), so neither beta nor a dual norm is logged for them."""
    net = make_net()
    vectors = [p for p in net.parameters() if p.dim() == 1]
    matrices = [p for p in net.parameters() if p.dim() == 2]
    opt = BADM([{"params": vectors, "preconditioner": "normalized", "sigma": 10.0, "rho": 90.0}, {"params": matrices}],
               sigma=30.0, mode=mode, preconditioner="newton_schulz")
    run_steps(net, opt, 2, mode=mode)
    m = opt.metrics()
    assert m["badm_step_size"] == pytest.approx(1 / 30.0) and m["badm_step_size/normalized"] == pytest.approx(0.1)
    assert m["badm_beta/normalized"] == pytest.approx(0.9) and m["badm_dual_norm/normalized"] > 0
    if mode == "fused":
        assert "badm_beta" not in m and "badm_dual_norm" not in m
    else:
        assert m["badm_beta"] == pytest.approx(0.5) and m["badm_dual_norm"] > 0
