"""newton_schulz on MoE models whose experts transformers fuses into 3-D tensors: what went where is reported; an
expert-parallel layout is refused. Each expert slice's step, part by part, against a literal per-expert Muon in float64:
tests/test_roles.py; the multi-rank runs (DDP, ZeRO-2/3): tests/test_distributed.py."""

from __future__ import annotations

import pytest
import torch

from hf_badm import BADM, BADMConfig
from hf_badm.factory import badm_param_groups, solve_report
from tiny import tiny_model

FAMILIES = ("mixtral", "qwen2_moe")


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
