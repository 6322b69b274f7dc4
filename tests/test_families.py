"""Every causal-LM family of the installed transformers, built tiny from its own config class (tests/families.py), routed
by what its tensors are (hf_badm.roles), checked against rules written here from the modules themselves: no 1-D tensor,
bias, embedding or head, normalisation, convolution kernel or state-space parameter orthogonalised; every hidden
``nn.Linear``/``Conv1D`` weight and every fused expert stack orthogonalised (fused projections of the families
hf_badm.roles.FUSED knows, part by part); one newton_schulz step finite. docs/families.md lists what each family holds
(scripts/family_roles.py)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from families import UNBUILDABLE, build_tiny, causal_lm_families, tiny_batch
from hf_badm import BADM, BADMConfig
from hf_badm.factory import badm_param_groups, solve_report
from hf_badm.roles import FUSED

CONFIG = BADMConfig(preconditioner="newton_schulz", sigma=100.0)
# How many families build tiny on the transformers CI installs (the newest pyproject admits); fewer is a regression.
BUILT = {"5.24.0": 193}


def _must_stay_elementwise(model: nn.Module) -> dict[str, str]:
    """Tensors no orthogonalising solve may take, and why, read from the model's modules."""
    out = {}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter)()
        if module is not None and getattr(module, "weight", None) is not None:
            embeddings.add(id(module.weight))
    for mname, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            name = f"{mname}.{attr}" if mname else attr
            if p.dim() <= 1:
                out[name] = "1-D"
            elif "bias" in attr:
                out[name] = "bias"
            elif id(p) in embeddings:
                out[name] = "embedding or head"
            elif isinstance(module, nn.modules.conv._ConvNd):
                out[name] = "convolution kernel"
            elif "norm" in type(module).__name__.lower():
                out[name] = "norm"
            elif attr in ("A_log", "D", "dt_bias"):
                out[name] = "state-space"
    return out


def _must_be_orthogonalised(model: nn.Module, elementwise: dict[str, str]) -> list[str]:
    """Hidden linear maps: nn.Linear / Conv1D weights and marked expert stacks (not an embedding or head)."""
    out = []
    for mname, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            name = f"{mname}.{attr}" if mname else attr
            linear = attr == "weight" and p.dim() == 2 and (isinstance(module, nn.Linear) or type(module).__name__ ==
                                                               "Conv1D")
            experts = p.dim() == 3 and hasattr(module, "is_transposed") and attr in ("gate_up_proj", "down_proj",
                                                                                     "up_proj")
            if (linear or experts) and name not in elementwise:
                out.append(name)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", causal_lm_families())
def test_every_family_is_routed_by_what_its_tensors_are(family):
    if family in UNBUILDABLE:
        pytest.skip(UNBUILDABLE[family])
    model = build_tiny(family)
    report = solve_report(model, CONFIG)
    solve = {role.name: s for role, s in report.routes}
    roles = {role.name: role for role, _ in report.routes}
    elementwise = _must_stay_elementwise(model)
    wrong = [f"{n} ({why})" for n, why in elementwise.items() if solve.get(n) == "newton_schulz"]
    assert not wrong, f"orthogonalised: {wrong}"
    missed = [n for n in _must_be_orthogonalised(model, elementwise) if n in solve and solve[n] != "newton_schulz"]
    assert not missed, f"linear maps left elementwise: {missed}"
    model_type = model.config.model_type
    fused = [n for n in solve if any(f == model_type and n.endswith(end) for f, end in FUSED)]
    assert all(len(roles[n].parts) >= 2 for n in fused), [(n, roles[n].parts) for n in fused]
    gated = [n for n in solve if roles[n].role == "experts" and n.endswith("gate_up_proj")]
    assert all(len(roles[n].parts) == 2 for n in gated), [(n, roles[n].parts) for n in gated]

    opt = BADM(badm_param_groups(model, 0.0, config=CONFIG), **CONFIG.optimizer_kwargs(0.01))
    model(**tiny_batch(model)).loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_count_of_families_built_tiny_does_not_fall():
    expected = BUILT.get(transformers.__version__)
    if expected is None:
        pytest.skip(f"the count is recorded for {sorted(BUILT)}, not transformers {transformers.__version__}")
    assert len(causal_lm_families()) - len(UNBUILDABLE) >= expected
