"""hf_badm.peers: torch's Muon (hidden matrices) + AdamW (the rest) as one Trainer optimizer."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer

from hf_badm.app.learning_rates import COMPARE_LEARNING_RATES
from hf_badm.optim.local_solve import LOCAL_SOLVES
from hf_badm.peers import MUON_ADAMW_LR, MuonWithAdamW, create_muon_optimizer, muon_param_groups
from tests.tiny import assert_loss_falls, chain_dataset, tiny_args, tiny_model


def _names(model, groups):
    ids = {id(p) for g in groups for p in g["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_hidden_matrices_to_muon_the_rest_to_adamw_with_the_trainers_decay_split(tmp_path):
    model = tiny_model("gpt2")
    opt, _ = create_muon_optimizer(model, tiny_args(tmp_path, learning_rate=0.03, weight_decay=0.1))
    muon = [g for g in opt.param_groups if g["optimizer"] == "muon"]
    adamw = [g for g in opt.param_groups if g["optimizer"] == "adamw"]
    assert opt.param_groups == muon + adamw  # Muon's groups first
    muon_names, adamw_names = _names(model, muon), _names(model, adamw)
    assert muon_names == {n for n, p in model.named_parameters()
                          if p.dim() == 2 and not n.startswith(("transformer.wte", "transformer.wpe", "lm_head"))}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight", "transformer.ln_f.weight",
            "transformer.h.0.attn.c_attn.bias"} <= adamw_names
    assert muon_names | adamw_names == {n for n, _ in model.named_parameters()} and not muon_names & adamw_names
    assert all(g["lr"] == 0.03 for g in muon) and all(g["lr"] == MUON_ADAMW_LR == 1 / LOCAL_SOLVES["normalized"].elementwise_sigma
                                                      for g in adamw)
    decayed = {n for g in opt.param_groups if g["weight_decay"] == 0.1 for n in _names(model, [g])}
    assert decayed == set(Trainer.get_decay_parameter_names(None, model))
    assert COMPARE_LEARNING_RATES["muon"] == COMPARE_LEARNING_RATES["badm-newton_schulz"]


def test_each_part_steps_exactly_like_torch_muon_and_adamw_alone(tmp_path):
    """The wrapper adds no math: its step equals torch.optim.Muon on the hidden groups and AdamW on the rest."""
    model = tiny_model("gpt2")
    twin = copy.deepcopy(model)
    opt, _ = create_muon_optimizer(model, tiny_args(tmp_path, weight_decay=0.1, learning_rate=0.02), adamw_lr=3e-3)
    hidden, rest = muon_param_groups(twin, 0.1)
    ref_muon = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.0)
    ref_adamw = torch.optim.AdamW(rest, lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ref_muon.step()
        ref_adamw.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n


def test_trainer_run_lowers_the_loss(tmp_path):
    model = tiny_model("gpt2")
    args = tiny_args(tmp_path, max_steps=30, learning_rate=0.03, lr_scheduler_type="cosine", warmup_steps=3)
    trainer = Trainer(model=model, args=args, train_dataset=chain_dataset(),
                      optimizers=create_muon_optimizer(model, args, adamw_lr=1e-2))
    trainer.train()
    assert_loss_falls(trainer, min_steps=30, ratio=0.85)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_scheduler_scales_both_parts_by_the_same_factor(tmp_path):
    model = tiny_model("gpt2")
    args = tiny_args(tmp_path, max_steps=20, learning_rate=0.03, lr_scheduler_type="linear", warmup_steps=10)
    opt, sched = create_muon_optimizer(model, args, adamw_lr=1e-2)
    for _ in range(5):
        opt.step()
        sched.step()
    factors = {round(g["lr"] / g["initial_lr"], 12) for g in opt.param_groups}
    assert len(factors) == 1 and 0 < factors.pop() < 1
    assert create_muon_optimizer(model, tiny_args(tmp_path, max_steps=-1, num_train_epochs=1))[1] is None


def test_state_dict_round_trip_resumes_bitwise(tmp_path):
    args = tiny_args(tmp_path, learning_rate=0.03, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen) for p in tiny_model("gpt2").parameters()] for _ in range(6)]

    def steps(model, opt, gs):
        for g in gs:
            for p, x in zip(model.parameters(), g):
                p.grad = x.clone()
            opt.step()

    straight = tiny_model("gpt2")
    opt, _ = create_muon_optimizer(straight, args)
    steps(straight, opt, grads)

    first = tiny_model("gpt2")
    opt1, _ = create_muon_optimizer(first, args)
    steps(first, opt1, grads[:3])
    saved = copy.deepcopy(opt1.state_dict())
    assert {k for s in saved["state"].values() for k in s} == {"momentum_buffer", "step", "exp_avg", "exp_avg_sq"}
    resumed = copy.deepcopy(first)
    opt2, _ = create_muon_optimizer(resumed, args)
    opt2.load_state_dict(saved)
    steps(resumed, opt2, grads[3:])
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, q)
    assert opt2._muon.state is opt2.state and opt2._adamw.param_groups[0] is opt2.param_groups[-len(opt2._adamw.param_groups)]


def test_state_bytes_are_muon_momentum_plus_adamw_moments(tmp_path):
    model = tiny_model("gpt2")
    opt, _ = create_muon_optimizer(model, tiny_args(tmp_path))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    hidden, rest = muon_param_groups(model, 0.0)
    expected = sum(p.numel() for g in hidden for p in g["params"]) + 2 * sum(p.numel() for g in rest for p in g["params"])
    got = sum(t.numel() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    assert got == expected


def test_a_model_without_hidden_matrices_gets_adamw_only():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4))
    opt = MuonWithAdamW(*muon_param_groups(model, 0.0), lr=0.03, adamw_lr=1e-3)
    assert {g["optimizer"] for g in opt.param_groups} == {"adamw"}
    with pytest.raises(ValueError, match="no parameters"):
        MuonWithAdamW([], [], lr=0.03, adamw_lr=1e-3)


def test_normuon_peer_steps_like_badm_normuon_and_trains(tmp_path):
    """NorMuon + AdamW: the same split as Muon's, groups tagged "normuon"; on fixed gradients its matrix steps equal
    BADM's normuon at rho = sigma (NorMuon, with Nesterov momentum that Newton-Schulz's normalisation makes equal to
    the peer's EMA one up to its 1e-7 floor); a Trainer run lowers the loss; the state round-trips."""
    from hf_badm import BADM
    from hf_badm.peers import NorMuon, NorMuonWithAdamW, create_normuon_optimizer
    from tests.test_muon import fixed_gradient_run

    model = tiny_model("gpt2")
    opt, _ = create_normuon_optimizer(model, tiny_args(tmp_path, learning_rate=0.03, weight_decay=0.1))
    assert isinstance(opt, NorMuonWithAdamW) and {g["optimizer"] for g in opt.param_groups} == {"normuon", "adamw"}
    muon, _ = create_muon_optimizer(tiny_model("gpt2"), tiny_args(tmp_path, learning_rate=0.03, weight_decay=0.1))
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in muon.param_groups]
    shapes, lr, wd = [(16, 6), (16, 16), (3, 16), (64, 32)], 0.02, 0.1
    ours = fixed_gradient_run(shapes, lambda ps: BADM(ps, lr=lr, weight_decay=wd, preconditioner="normuon",
                                                      ns_dtype="float32"))
    theirs = fixed_gradient_run(shapes, lambda ps: NorMuon(ps, lr=lr, weight_decay=wd))
    for a, b in zip(ours, theirs):
        assert float((a - b).norm() / b.norm()) <= 1e-4
    assert COMPARE_LEARNING_RATES["normuon"] == COMPARE_LEARNING_RATES["muon"]
    model = tiny_model("gpt2")
    args = tiny_args(tmp_path, max_steps=30, learning_rate=0.03, lr_scheduler_type="cosine", warmup_steps=3)
    trainer = Trainer(model=model, args=args, train_dataset=chain_dataset(),
                      optimizers=create_normuon_optimizer(model, args, adamw_lr=1e-2))
    trainer.train()
    assert_loss_falls(trainer, min_steps=30, ratio=0.85)
    again, _ = create_normuon_optimizer(tiny_model("gpt2"), args)
    again.load_state_dict(trainer.optimizer.state_dict())
    assert all(torch.equal(a["second_momentum_buffer"], b["second_momentum_buffer"])
               for a, b in zip(trainer.optimizer.state.values(), again.state.values()) if "second_momentum_buffer" in a)


def test_qhadam_equals_its_formula_and_is_adamw_at_nu_one():
    """QHAdam against the paper's update written out (float64, decoupled decay, a changing lr); nus (1, 1) is torch's
    AdamW; the Muon + QHAdam peer tags its groups and lowers a Trainer's loss."""
    from hf_badm.peers import QHAdam

    torch.manual_seed(0)
    w0 = torch.randn(5, 3, dtype=torch.float64)
    grads = [torch.randn(5, 3, dtype=torch.float64) for _ in range(6)]
    b1, b2, nu1, nu2, eps, wd = 0.9, 0.99, 0.7, 0.8, 1e-8, 0.1
    p = w0.clone().requires_grad_()
    opt = QHAdam([p], lr=0.01, betas=(b1, b2), nus=(nu1, nu2), eps=eps, weight_decay=wd)
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    for t, g in enumerate(grads, 1):
        lr = 0.01 * (1 + 0.1 * t)
        opt.param_groups[0]["lr"] = lr
        p.grad = g.clone()
        opt.step()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        num = (1 - nu1) * g + nu1 * m / (1 - b1**t)
        den = ((1 - nu2) * g * g + nu2 * v / (1 - b2**t)).sqrt() + eps
        w = w * (1 - lr * wd) - lr * num / den
    assert torch.allclose(p.detach(), w, rtol=1e-12, atol=1e-14)
    a, b = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    qh, adamw = QHAdam([a], lr=0.01, nus=(1.0, 1.0), weight_decay=wd), torch.optim.AdamW([b], lr=0.01, weight_decay=wd)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        qh.step()
        adamw.step()
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="nus"):
        QHAdam([a], nus=(1.5, 1.0))


def test_muon_qhadam_peer_trains(tmp_path):
    from hf_badm.peers import MuonWithQHAdam, QHADAM_NU, create_muon_qhadam_optimizer

    model = tiny_model("gpt2")
    args = tiny_args(tmp_path, max_steps=30, learning_rate=0.03, lr_scheduler_type="cosine", warmup_steps=3)
    opt, sched = create_muon_qhadam_optimizer(model, args, adamw_lr=1e-2)
    assert isinstance(opt, MuonWithQHAdam) and {g["optimizer"] for g in opt.param_groups} == {"muon", "qhadam"}
    assert all(g["nus"] == (QHADAM_NU, 1.0) for g in opt.param_groups if g["optimizer"] == "qhadam")
    trainer = Trainer(model=model, args=args, train_dataset=chain_dataset(), optimizers=(opt, sched))
    trainer.train()
    assert_loss_falls(trainer, min_steps=30, ratio=0.85)
