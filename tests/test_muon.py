"""newton_schulz against literal Newton-Schulz references: fused at rho = sigma is Muon; rho != sigma is
BADM over Muon's direction; per-sub-batch mode orthogonalises each slot's own momentum (NSISA)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_badm import BADM
from reference import LiteralBADM, LiteralMuon, NesterovNS
from test_optimizer import SUBS, literal_grads, make_net, max_rel, mse, optimizer_step, run_steps, sub_batches

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
    muon_like_run(opt, ref, net)
    assert max_rel(list(net.parameters()), ref.w) <= 1e-12


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_newton_schulz_is_badm_over_nesterov_ns_directions(mode):
    """The literal slots of docs/algorithm.md §2 with d_s in place of g_s: per-sub-batch, each slot's own Nesterov
    NS momentum (unequal, changing weights); fused, every slot takes the direction of the mean gradient."""
    net = matrix_net()
    sigma, rho, wd = 20.0, 50.0, 0.05
    opt = BADM(net.parameters(), sigma=sigma, rho=rho, weight_decay=wd, mode=mode, preconditioner="newton_schulz",
               ns_dtype="float64")
    assert literal_directions_run(net, opt, NesterovNS, sigma, rho, wd, mode) <= 1e-10


def literal_directions_run(net, opt, direction_cls, sigma, rho, wd, mode) -> float:
    """The literal slots of docs/algorithm.md §2 with a direction ``direction_cls(params)(grads)`` in place of g_s
    (per-sub-batch: one per slot, unequal and changing weights; fused: the direction of the mean gradient for every
    slot) against ``opt`` under a schedule: the largest relative difference of the weights after STEPS steps."""
    params = list(net.parameters())
    ref = LiteralBADM(params, sigma, rho, wd)
    directions = [direction_cls(params) for _ in range(SUBS if mode == "per_sub_batch" else 1)]
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
        optimizer_step(net, opt, batches, sizes, mode)
        sched.step()
    return max_rel(params, ref.w)


def fixed_gradient_run(shapes, opt_fn, steps: int = 10) -> list[torch.Tensor]:
    """Displacements of float32 matrices under one fixed sequence of gradients (no feedback through a loss,
    so differences between two optimizers do not grow chaotically)."""
    torch.manual_seed(0)
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    start = [p.detach().clone() for p in params]
    opt, gen = opt_fn(params), torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach() - s for p, s in zip(params, start)]


@pytest.mark.parametrize("ns_dtype, tol", [("auto", 0.05), ("bfloat16", 0.1)])
def test_fused_newton_schulz_matches_torch_muon(ns_dtype, tol):
    """torch.optim.Muon runs Newton-Schulz in bfloat16 (8 significant bits; measured: its updates differ from a
    float32 NS by ~3% after 10 steps, and ~5% from another bf16 rounding order). Its EMA momentum
    (B <- mu B + (1 - mu) G, G + mu (B - G)) is (1 - mu) times Nesterov's, which NS normalises away; the
    "original" lr adjustment is the sqrt(max(1, rows/cols)) scale. A 10% error in lr would fail the float32 case."""
    shapes, lr, wd = [(16, 6), (16, 16), (3, 16), (64, 32)], 0.02, 0.1
    ours = fixed_gradient_run(shapes, lambda ps: BADM(ps, lr=lr, weight_decay=wd, preconditioner="newton_schulz",
                                                      ns_dtype=ns_dtype))
    theirs = fixed_gradient_run(shapes, lambda ps: torch.optim.Muon(ps, lr=lr, weight_decay=wd, adjust_lr_fn="original"))
    for a, b in zip(ours, theirs):
        assert float((a - b).norm() / b.norm()) <= tol


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in an optimizer's state (lists of per-slot tensors included)."""
    tensors = [t for s in opt.state.values() for v in s.values() for t in (v if isinstance(v, list) else [v])
               if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_default_newton_schulz_state_is_at_most_muon_plus_adamw():
    """rho = sigma (the default): fused mode keeps no `momentum` on the orthogonalised matrices (c = 0), so
    its state is Muon's on the matrices and AdamW-sized elsewhere."""
    from hf_badm import BADMConfig
    from hf_badm.factory import badm_param_groups
    from tiny import tiny_model

    models = [tiny_model("gpt2"), tiny_model("gpt2")]
    badm = BADM(badm_param_groups(models[0], 0.1, config=BADMConfig(preconditioner="newton_schulz")),
                **BADMConfig(preconditioner="newton_schulz").optimizer_kwargs(0.03))
    matrices = [p for g in badm.param_groups if g["preconditioner"] == "newton_schulz" for p in g["params"]]
    index = {id(p): i for i, p in enumerate(models[0].parameters())}
    theirs = list(models[1].parameters())
    hidden = [theirs[index[id(p)]] for p in matrices]
    rest = [p for p in theirs if all(p is not h for h in hidden)]
    peers = [torch.optim.Muon(hidden, lr=0.03), torch.optim.AdamW(rest, lr=1e-3)]
    ids = torch.randint(0, models[0].config.vocab_size, (2, 8))
    for model, opts in zip(models, ([badm], peers)):
        model(input_ids=ids, labels=ids).loss.backward()
        for opt in opts:
            opt.step()
    assert matrices and all("momentum" not in badm.state[p] for p in matrices)
    assert 0 < state_bytes(badm) <= sum(state_bytes(opt) for opt in peers)


def test_newton_schulz_keeps_the_dual_where_it_acts():
    """rho != sigma: c != 0, the dual is BADM's quasi-hyperbolic momentum over the NS directions and is kept."""
    net = matrix_net()
    opt = BADM(net.parameters(), sigma=20.0, rho=50.0, preconditioner="newton_schulz")
    x, y = sub_batches(0)[0]
    mse(net, x, y).backward()
    opt.step()
    assert all(sorted(opt.state[p]) == ["momentum", "momentum_buffer"] for p in net.parameters())


@pytest.mark.parametrize("batched", [True, False])
def test_batched_newton_schulz_equals_the_per_matrix_iteration_in_float32(batched):
    """Both forms of ``orthogonalise`` (matrices of one shape stacked and iterated with batched products, as on
    accelerators; matrix by matrix with fused addmm, as on the CPU) within 3e-6 of the literal 2-D iteration in
    float32 (wide, tall, square; several per shape; float64 inputs too): float32 rounding over 15 matmuls."""
    from hf_badm.optim.solves.newton_schulz import orthogonalise
    from reference import newton_schulz5

    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 6), (6, 16), (16, 16), (16, 6), (33, 7), (16, 16), (16, 6)]
    inputs = [torch.randn(s, generator=gen, dtype=torch.float64 if i == 1 else torch.float32) for i, s in enumerate(shapes)]
    outputs = orthogonalise(inputs, 5, torch.float32, batched=batched)
    for x, out in zip(inputs, outputs):
        expected = newton_schulz5(x.float()) * max(1.0, x.shape[0] / x.shape[1]) ** 0.5
        assert out.dtype == x.dtype and out.shape == x.shape
        assert float((out.float() - expected).norm() / expected.norm()) <= 3e-6


class Recorder:
    """An orthogonaliser that records its calls and delegates to the default."""

    def __init__(self):
        from hf_badm.optim.solves.newton_schulz import orthogonalise

        self.calls, self.default = [], orthogonalise

    def __call__(self, params, inputs, steps, dtype):
        self.calls.append(([tuple(x.shape) for x in inputs], steps, dtype))
        return self.default(inputs, steps, dtype)


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_one_orthogonaliser_call_per_step_or_absorb_with_every_matrix(mode):
    """The seam the data-parallel split plugs into: every Newton-Schulz matrix of every group (not the
    vectors of the fallback solve) in one call per fused step, or per absorbed sub-batch; the result equals
    the default's."""
    nets = [make_net(), make_net()]
    opts = [BADM([{"params": [p for p in net.parameters() if p.dim() == 2][:2]},
                  {"params": [p for p in net.parameters() if p.dim() == 2][2:] + [p for p in net.parameters() if p.dim() == 1],
                   "sigma": 40.0, "rho": 60.0}], sigma=30.0, mode=mode, preconditioner="newton_schulz")
            for net in nets]
    recorder = opts[0].orthogonaliser = Recorder()
    for net, opt in zip(nets, opts):
        run_steps(net, opt, 2, mode=mode)
    assert len(recorder.calls) == (2 if mode == "fused" else 2 * SUBS)
    assert all(call == ([(16, 6), (16, 16), (3, 16)], 5, torch.float32) for call in recorder.calls)
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))


def test_ns_dtype_reaches_the_orthogonaliser_and_is_validated():
    from hf_badm import BADMConfig
    from hf_badm.optim.solves.newton_schulz import resolve_ns_dtype

    assert resolve_ns_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_ns_dtype("auto", torch.device("cuda")) == torch.bfloat16  # as torch.optim.Muon
    results = {}
    for ns_dtype in ("bfloat16", "float64"):
        net = matrix_net()
        opt = BADM(net.parameters(), lr=0.03, preconditioner="newton_schulz", ns_dtype=ns_dtype)
        recorder = opt.orthogonaliser = Recorder()
        run_steps(net, opt, 2)
        assert {dtype for _, _, dtype in recorder.calls} == {getattr(torch, ns_dtype)}
        results[ns_dtype] = [p.detach().clone() for p in net.parameters()]
    # bf16 Newton-Schulz moves the parameters differently, but only by its rounding
    assert 0 < max_rel(results["bfloat16"], results["float64"]) < 0.1
    assert BADMConfig(ns_dtype="bfloat16").optimizer_kwargs(0.03)["ns_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="ns_dtype"):
        BADM(matrix_net().parameters(), ns_dtype="int8")
    with pytest.raises(ValueError, match="ns_dtype"):
        BADMConfig(ns_dtype="half")


class LiteralNorMuon:
    """NorMuon on matrices (tests/reference.py): Muon's Nesterov NS direction O per matrix, the row normalisation
    with its per-row EMA, then the sqrt(max(1, rows/cols)) scale; W <- W (1 - lr wd) - lr d."""

    def __init__(self, params, lr, weight_decay=0.0):
        self.w = [p.detach().clone() for p in params]
        self.lr, self.weight_decay = lr, weight_decay
        self.bufs = [torch.zeros_like(p) for p in params]
        self.rows = [torch.zeros(p.shape[0], 1, dtype=p.dtype) for p in params]

    def step(self, grads, factor=1.0):
        from reference import newton_schulz5, normuon_rows

        lr = self.lr * factor
        self.bufs = [0.95 * b + g for b, g in zip(self.bufs, grads)]
        new = []
        for i, (w, g, b) in enumerate(zip(self.w, grads, self.bufs)):
            o, self.rows[i] = normuon_rows(newton_schulz5(g + 0.95 * b), self.rows[i])
            new.append(w * (1 - lr * self.weight_decay) - lr * o * max(1.0, g.shape[0] / g.shape[1]) ** 0.5)
        self.w = new


def muon_like_run(opt, ref, net, steps=STEPS):
    """Fused steps of ``opt`` on the mean gradient and ``ref.step`` on the same gradient, with a schedule."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for t in range(steps):
        batches = sub_batches(t)
        grads = literal_grads(net, LiteralBADM(ref.w, 1.0, 1.0), batches)
        ref.step([sum(g[i] for g in grads) / SUBS for i in range(len(ref.w))], factor(t))
        opt.zero_grad()
        sum(mse(net, x, y) for x, y in batches).div(SUBS).backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("foreach", [False, True])
def test_fused_normuon_at_rho_equal_sigma_is_normuon(foreach):
    net = matrix_net()
    ref = LiteralNorMuon(list(net.parameters()), lr=0.03, weight_decay=0.1)
    opt = BADM(net.parameters(), lr=0.03, weight_decay=0.1, preconditioner="normuon", ns_dtype="float64",
               foreach=foreach)
    muon_like_run(opt, ref, net)
    assert max_rel(list(net.parameters()), ref.w) <= 1e-12
    assert all(opt.state[p]["row_sq"].shape == (p.shape[0], 1) for p in net.parameters())


def test_normuon_per_slot_state_round_trips():
    net = matrix_net()
    opt = BADM(net.parameters(), lr=0.03, mode="per_sub_batch", preconditioner="normuon", ns_dtype="float64")
    run_steps(net, opt, 2, mode="per_sub_batch")
    again = BADM(matrix_net().parameters(), lr=0.03, mode="per_sub_batch", preconditioner="normuon")
    again.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="row_sq"):
        sd = opt.state_dict()
        sd["state"][0]["row_sq"][0] = torch.zeros(16, 6, dtype=torch.float64)
        again.load_state_dict(sd)


def nesterov_direction(params, polar, scale):
    """Muon's Nesterov momentum with ``polar`` (a literal NS of tests/reference.py) and the lr ``scale`` of a shape."""
    nest = NesterovNS(params)

    def direction(grads):
        nest.bufs = [nest.mu * b + g for b, g in zip(nest.bufs, grads)]
        return [polar(g + nest.mu * b) * scale(g.shape) for g, b in zip(grads, nest.bufs)]

    return direction


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("coefficients, lr_scale", [("polar_express", "original"), ("muon", "match_rms_adamw"),
                                                     ("polar_express", "match_rms_adamw")])
def test_polar_express_and_match_rms_adamw_equal_their_references(coefficients, lr_scale, foreach):
    """ns_coefficients="polar_express": Muon with the Polar Express polynomials; ns_lr_scale="match_rms_adamw": the
    update of an A x B matrix is 0.2 sqrt(max(A, B)) NS(.) (Moonshot's) instead of sqrt(max(1, A/B)) NS(.)."""
    from reference import newton_schulz5, polar_express5

    net = matrix_net()
    params = list(net.parameters())
    ref = LiteralMuon(params, lr=0.03, weight_decay=0.1)
    polar = polar_express5 if coefficients == "polar_express" else newton_schulz5
    ref.direction = nesterov_direction(params, polar, (lambda s: max(1.0, s[0] / s[1]) ** 0.5) if lr_scale == "original"
                                       else (lambda s: 0.2 * max(s) ** 0.5))
    opt = BADM(params, lr=0.03, weight_decay=0.1, preconditioner="newton_schulz", ns_dtype="float64",
               ns_coefficients=coefficients, ns_lr_scale=lr_scale, foreach=foreach)
    muon_like_run(opt, ref, net)
    assert max_rel(params, ref.w) <= 1e-12
