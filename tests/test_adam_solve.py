"""preconditioner="adam" against literal references: fused at rho = sigma it is torch's AdamW; rho != sigma is BADM
over Adam's directions (per slot in per-sub-batch mode); as newton_schulz's elementwise solve the optimizer is Muon on
the matrices plus AdamW on the rest, the Muon peer's split."""

from __future__ import annotations

import pytest
import torch

from hf_badm import BADM, BADMConfig
from hf_badm.factory import badm_param_groups
from reference import LiteralMuon
from test_muon import factor, literal_directions_run
from test_optimizer import make_net, max_rel, mse, sub_batches

STEPS = 8


class AdamDirection:
    """Adam's bias-corrected direction, written out: m, v EMAs; (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)."""

    def __init__(self, params, b1=0.9, b2=0.999, eps=1e-8):
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.b1, self.b2, self.eps, self.t = b1, b2, eps, 0

    def __call__(self, grads):
        self.t += 1
        self.m = [self.b1 * m + (1 - self.b1) * g for m, g in zip(self.m, grads)]
        self.v = [self.b2 * v + (1 - self.b2) * g * g for v, g in zip(self.v, grads)]
        return [(m / (1 - self.b1**self.t)) / ((v / (1 - self.b2**self.t)).sqrt() + self.eps)
                for m, v in zip(self.m, self.v)]


@pytest.mark.parametrize("foreach", [False, True])
def test_fused_adam_at_rho_equal_sigma_is_torch_adamw(foreach):
    net, ref_net = make_net(), make_net()
    lr, wd = 0.01, 0.1
    opt = BADM(net.parameters(), lr=lr, weight_decay=wd, preconditioner="adam", foreach=foreach)
    assert opt.param_groups[0]["rho"] == opt.param_groups[0]["sigma"]  # its default
    ref = torch.optim.AdamW(ref_net.parameters(), lr=lr, weight_decay=wd, foreach=foreach)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (opt, ref)]
    for t in range(STEPS):
        for model, o in ((net, opt), (ref_net, ref)):
            o.zero_grad()
            sum(mse(model, x, y) for x, y in sub_batches(t)).backward()
            o.step()
        for s in scheds:
            s.step()
    assert max_rel(list(net.parameters()), list(ref_net.parameters())) <= 1e-12


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_adam_with_rho_not_sigma_is_badm_over_adam_directions(mode):
    """The literal slots with Adam's direction in place of g_s: per slot its own moments, fused the direction of the
    mean gradient for every slot."""
    net = make_net()
    sigma, rho, wd = 100.0, 300.0, 0.05
    opt = BADM(net.parameters(), sigma=sigma, rho=rho, weight_decay=wd, mode=mode, preconditioner="adam")
    assert literal_directions_run(net, opt, AdamDirection, sigma, rho, wd, mode) <= 1e-10


def test_newton_schulz_with_adam_elsewhere_is_muon_plus_adamw():
    """Weights take Muon (decayed), biases AdamW at the elementwise lr (not decayed, the Trainer's rule)."""
    net = make_net()
    lr, elr, wd = 0.02, 0.005, 0.1
    config = BADMConfig(preconditioner="newton_schulz", elementwise_preconditioner="adam", elementwise_sigma=1 / elr,
                        ns_dtype="float64")
    opt = BADM(badm_param_groups(net, wd, config=config), **config.optimizer_kwargs(lr))
    weights = [p for n, p in net.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in net.named_parameters() if n.endswith("bias")]
    muon = LiteralMuon(weights, lr=lr, weight_decay=wd)
    adam = AdamDirection(biases)
    b = [p.detach().clone() for p in biases]
    for t in range(STEPS):
        x, y = sub_batches(t, [12])[0]
        opt.zero_grad()
        mse(net, x, y).backward()
        opt.step()
        names = [n for n, _ in net.named_parameters()]
        current = dict(zip([n for n in names if n.endswith("weight")], muon.w)) | dict(
            zip([n for n in names if n.endswith("bias")], b))
        out = torch.func.functional_call(net, {n: current[n].requires_grad_() for n in names}, (x,))
        grads = dict(zip(names, torch.autograd.grad(((out - y) ** 2).mean(), [current[n] for n in names])))
        muon.step([grads[n] for n in names if n.endswith("weight")])
        b = [w - elr * d for w, d in zip(b, adam([grads[n] for n in names if n.endswith("bias")]))]
    assert max_rel(weights, muon.w) <= 1e-10
    assert max_rel(biases, b) <= 1e-10


def test_adam_settings_are_validated_and_kept_in_state():
    net = make_net()
    with pytest.raises(ValueError, match="beta1"):
        BADM(net.parameters(), lr=0.01, preconditioner="adam", beta1=1.5)
    opt = BADM(net.parameters(), lr=0.01, preconditioner="adam", beta1=0.8)
    mse(net, *sub_batches(0, [5])[0]).backward()
    opt.step()
    state = opt.state_dict()
    again = BADM(make_net().parameters(), lr=0.01, preconditioner="adam")
    again.load_state_dict(state)
    assert again.param_groups[0]["beta1"] == 0.8
    assert set(again.state[again.param_groups[0]["params"][0]]) >= {"exp_avg", "exp_avg_sq", "steps"}
