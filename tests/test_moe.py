"""newton_schulz on MoE models whose experts transformers fuses into 3-D tensors (experts, out, in): each expert slice
is orthogonalised on its own, checked against a literal per-expert Muon in float64; what went where is reported; an
expert-parallel layout is refused. The multi-rank runs (DDP, ZeRO-2/3) are in tests/test_distributed.py."""

from __future__ import annotations

import math

import pytest
import torch

from hf_badm import BADM, BADMConfig
from hf_badm.factory import badm_param_groups, solve_report
from reference import newton_schulz5
from tiny import chain_dataset, tiny_model

FAMILIES = ("mixtral", "qwen2_moe")


def first_step(family: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """One fused newton_schulz step at rho = sigma on a float64 MoE model: (model, weights before, gradients, lr)."""
    model = tiny_model(family).double()
    model.set_experts_implementation("eager")  # the grouped matmul kernel takes no float64
    config = BADMConfig(preconditioner="newton_schulz", sigma=20.0, ns_dtype="float64")
    opt = BADM(badm_param_groups(model, 0.0, config=config), **config.optimizer_kwargs(0.05))
    batch = {k: torch.tensor(v) for k, v in chain_dataset(n=8)[:8].items()}
    model(**batch).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return model, before, grads, 1.0 / 20.0


@pytest.mark.parametrize("family", FAMILIES)
def test_each_expert_slice_steps_by_ns5_of_its_own_gradient(family):
    """Muon's first step on a matrix is -lr NS5(g + mu g) sqrt(max(1, rows/cols)) (the momentum is g): per expert
    slice of every fused 3-D tensor, against the literal iteration, slice by slice."""
    model, before, grads, lr = first_step(family)
    experts = {n: p for n, p in model.named_parameters() if p.dim() == 3}
    assert experts, "the model should fuse its experts into 3-D tensors"
    for name, p in experts.items():
        for e in range(p.shape[0]):
            g = grads[name][e]
            if not g.abs().sum():
                continue  # an expert that got no token this step
            rows, cols = g.shape
            expected = -lr * newton_schulz5(g + 0.95 * g) * math.sqrt(max(1.0, rows / cols))
            step = p.detach()[e] - before[name][e]
            cosine = torch.nn.functional.cosine_similarity(step.flatten(), expected.flatten(), dim=0)
            assert cosine >= 0.99, (name, e, float(cosine))
            torch.testing.assert_close(step, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_report_shows_experts_and_router_orthogonalised_and_embeddings_elementwise(family):
    """Every hidden matrix and expert stack takes newton_schulz, the router too (a 2-D hidden weight, as Moonlight's
    Muon treats it); the embeddings and LM head go elementwise and are named."""
    model = tiny_model(family)
    report = solve_report(model, BADMConfig(preconditioner="newton_schulz"))
    hidden = [n for n, p in model.named_parameters() if p.dim() > 1 and "embed" not in n and "lm_head" not in n]
    assert report.tensors["newton_schulz"] == len(hidden)
    assert any("gate_up_proj" in n for n in hidden) and any(n.endswith("gate.weight") for n in hidden)
    assert set(report.elementwise_matrices) == {"model.embed_tokens.weight", "lm_head.weight"}
    line = str(report)
    assert "\n" not in line and "newton_schulz" in line and "lm_head.weight" in line
    assert report.parameters["newton_schulz"] + report.parameters["normalized"] == sum(
        p.numel() for p in model.parameters())


def test_an_expert_parallel_layout_is_refused():
    model = tiny_model("mixtral")
    next(m for m in model.modules() if type(m).__name__ == "MixtralExperts")._is_expert_parallel = True
    with pytest.raises(ValueError, match="expert-parallel"):
        badm_param_groups(model, 0.0, config=BADMConfig(preconditioner="newton_schulz"))


def test_newton_schulz_with_nothing_to_orthogonalise_is_refused_at_start_up():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match="no hidden weight matrix"):
        badm_param_groups(model, 0.0, config=BADMConfig(preconditioner="newton_schulz"))


def test_a_strict_group_refuses_a_tensor_it_cannot_orthogonalise():
    """What badm_param_groups makes for the matrices: a flat tensor there (a ZeRO partition without its layout)
    stops the step with one line instead of silently taking the elementwise solve."""
    w = torch.nn.Parameter(torch.randn(12))
    opt = BADM([{"params": [w], "strict": True}], sigma=10.0, preconditioner="newton_schulz")
    w.grad = torch.randn(12)
    with pytest.raises(ValueError, match="not a whole matrix") as err:
        opt.step()
    assert "\n" not in str(err.value)
    loose = BADM([w], sigma=10.0, preconditioner="newton_schulz")  # without strict: the documented fallback
    loose.step()
