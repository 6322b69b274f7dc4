"""preconditioner="nsisa": the authors' NSISA equals a literal transcription of their script's step (float64,
4 slots, 5 steps, a schedule), with gamma = alpha (their dual scaling) or 1 (the paper's), with and without the
warm-down sigma_t = sigma/f_t**2; fused mode is its one-slot case on the reduced gradient."""

from __future__ import annotations

import pytest
import torch

from hf_badm import BADM
from reference import LiteralNSISA
from test_muon import factor, matrix_net
from test_optimizer import SUBS, literal_grads, max_rel, optimizer_step, sub_batches

STEPS = 5


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
@pytest.mark.parametrize("dual_scale", ["weight", "one"])
@pytest.mark.parametrize("warm_down", [False, True])
def test_nsisa_equals_the_authors_step(mode, dual_scale, warm_down, foreach):
    assert SUBS == 4
    net = matrix_net()
    params = list(net.parameters())
    sigma, rho = 80.0, 100.0
    ref = LiteralNSISA(params, sigma, rho, dual_scale=dual_scale, warm_down=warm_down)
    opt = BADM(params, sigma=sigma, rho=rho, mode=mode, preconditioner="nsisa", ns_dtype="float64", foreach=foreach,
               dual_scale=dual_scale, sigma_schedule="squared" if warm_down else "linear")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for t in range(STEPS):
        sizes = [3 + (t + s) % 5 for s in range(SUBS)]
        batches = sub_batches(t, sizes)
        grads = literal_grads(net, ref, batches)
        if mode == "fused":  # one slot: the gradient of the mean loss over all the rows
            total = sum(sizes)
            ref.step([[sum(n * g[i] for n, g in zip(sizes, grads)) / total for i in range(len(params))]], [1.0],
                     factor=factor(t))
        else:
            ref.step(grads, [float(n) for n in sizes], factor=factor(t))
        optimizer_step(net, opt, batches, sizes, mode)
        sched.step()
    assert max_rel(params, ref.w) <= 1e-10


def test_nsisa_defaults_and_settings_are_its_own():
    opt = BADM(matrix_net().parameters(), sigma=80.0, preconditioner="nsisa")
    group = opt.param_groups[0]
    assert group["rho"] == 100.0 and group["dual_scale"] == "weight" and group["sigma_schedule"] == "linear"
    with pytest.raises(ValueError, match="dual_scale"):
        BADM(matrix_net().parameters(), preconditioner="nsisa", dual_scale="alpha")
    with pytest.raises(ValueError, match="sigma_schedule"):
        BADM(matrix_net().parameters(), preconditioner="nsisa", sigma_schedule="cubic")
