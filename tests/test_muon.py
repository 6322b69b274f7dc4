"""newton_schulz against literal Newton-Schulz references: fused at rho = sigma is Muon; rho != sigma is
BADM over Muon's direction; per-sub-batch mode orthogonalises each slot's own momentum (NSISA)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_badm import BADM
from reference import LiteralBADM, LiteralMuon, NesterovNS
from test_optimizer import SUBS, literal_grads, max_rel, mse, sub_batches

STEPS = 10


def matrix_net(seed: int = 0, dtype=torch.float64) -> nn.Module:
    """Weight matrices only (wide, square and tall), so every parameter is orthogonalised."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16, bias=False), nn.Tanh(), nn.Linear(16, 16, bias=False), nn.Tanh(),
                         nn.Linear(16, 3, bias=False)).to(dtype)


def factor(t: int) -> float:
    return 0.5 + 0.5 * math.cos(0.2 * t) ** 2


@pytest.mark.parametrize("foreach", [False, True])
def test_fused_newton_schulz_at_rho_equal_sigma_is_muon(foreach):
    net = matrix_net()
    lr, wd = 0.03, 0.1
    ref = LiteralMuon(list(net.parameters()), lr=lr, weight_decay=wd)
    opt = BADM(net.parameters(), lr=lr, weight_decay=wd, preconditioner="newton_schulz", ns_dtype="float64",
               foreach=foreach)
    assert opt.param_groups[0]["rho"] == opt.param_groups[0]["sigma"]  # the default
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for t in range(STEPS):
        batches = sub_batches(t)
        grads = literal_grads(net, LiteralBADM(ref.w, 1.0, 1.0), batches)
        ref.step([sum(g[i] for g in grads) / SUBS for i in range(len(ref.w))], factor(t))
        opt.zero_grad()
        sum(mse(net, x, y) for x, y in batches).div(SUBS).backward()
        opt.step()
        sched.step()
    assert max_rel(list(net.parameters()), ref.w) <= 1e-12


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_newton_schulz_is_badm_over_nesterov_ns_directions(mode):
    """The literal slots of BADM.md §2 with d_s in place of g_s: per-sub-batch, each slot's own Nesterov
    NS momentum (unequal, changing weights); fused, every slot takes the direction of the mean gradient."""
    net = matrix_net()
    sigma, rho, wd = 20.0, 50.0, 0.05
    params = list(net.parameters())
    ref = LiteralBADM(params, sigma, rho, wd)
    directions = [NesterovNS(params) for _ in range(SUBS if mode == "per_sub_batch" else 1)]
    opt = BADM(params, sigma=sigma, rho=rho, weight_decay=wd, mode=mode, preconditioner="newton_schulz",
               ns_dtype="float64")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for t in range(STEPS):
        sizes = [3 + (t + s) % 5 for s in range(SUBS)] if mode == "per_sub_batch" else [5] * SUBS
        batches = sub_batches(t, sizes)
        grads = literal_grads(net, ref, batches)
        if mode == "per_sub_batch":
            ds = [direction(g) for direction, g in zip(directions, grads)]
        else:
            ds = [directions[0]([sum(g[i] for g in grads) / SUBS for i in range(len(params))])] * SUBS
        ref.step(ds, [float(n) for n in sizes], factor=factor(t))
        opt.zero_grad()
        if mode == "fused":
            sum(mse(net, x, y) for x, y in batches).div(SUBS).backward()
        else:
            for (x, y), n in zip(batches, sizes):
                mse(net, x, y).backward()
                opt.absorb_sub_batch(n)
        opt.step()
        sched.step()
    assert max_rel(params, ref.w) <= 1e-10
