"""What a tensor is decides its solve (hf_badm.roles): fused projections step part by part, each part's step checked
against a literal per-part Muon step in float64 (the layouts written out here from the modeling files, independently
of hf_badm.roles.FUSED); unknown tensors are named and left elementwise; name overrides are checked at start-up."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_badm import BADM, BADMConfig
from hf_badm.factory import badm_param_groups, solve_report
from reference import newton_schulz5
from tiny import tiny_model

LR, MU = 0.05, 0.95


def tiny(model_type: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=48, max_position_embeddings=64, pad_token_id=0,
                                  **extra)
    return AutoModelForCausalLM.from_config(config)


def first_step(model: torch.nn.Module, **config) -> tuple[dict, dict, dict]:
    """One fused newton_schulz step at rho = sigma in float64 (the momentum is the gradient): before, grads, after."""
    model = model.double()
    if any(p.dim() == 3 for p in model.parameters()):
        model.set_experts_implementation("eager")
    cfg = BADMConfig(preconditioner="newton_schulz", sigma=1 / LR, ns_dtype="float64", **config)
    opt = BADM(badm_param_groups(model, 0.0, config=cfg), **cfg.optimizer_kwargs(LR))
    ids = torch.randint(1, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return before, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def literal_step(g: torch.Tensor, parts: list[list[int]]) -> torch.Tensor:
    """Muon's first step on a (rows x in) map whose output rows hold ``parts``: each part NS5 on its own, scaled by
    sqrt(max(1, part rows / in)), written back to its rows."""
    out = torch.zeros_like(g)
    for rows in parts:
        part = (1 + MU) * g[rows]
        out[rows] = -LR * newton_schulz5(part) * math.sqrt(max(1.0, len(rows) / g.shape[1]))
    return out


def check(model: torch.nn.Module, expected_parts: dict[str, tuple[bool, list[list[int]]]], **config) -> None:
    """Each named weight (``transposed``: stored (in, out); its parts' output rows) steps by the literal per-part
    step, within 1e-10 relative (float64); expert stacks slice by slice."""
    before, grads, after = first_step(model, **config)
    for suffix, (transposed, parts) in expected_parts.items():
        names = [n for n in grads if n.endswith(suffix)]
        assert names, suffix
        for name in names:
            g, step = grads[name], after[name] - before[name]
            slices = [(g, step)] if g.dim() == 2 else list(zip(g, step))
            for gs, ss in slices:
                if not gs.abs().sum():
                    continue  # an expert that got no token
                m, s = (gs.T, ss.T) if transposed else (gs, ss)
                expected = literal_step(m, parts)
                assert float((s - expected).norm() / expected.norm()) <= 1e-10, name


def concatenated(*sizes: int) -> list[list[int]]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [list(range(a, a + n)) for a, n in zip(starts, sizes)]


def test_gpt2_c_attn_steps_q_k_v_each_on_its_own():
    """GPT-2's Conv1D stores (in, out); c_attn's 96 outputs are q, k, v of 32 each (split(embed_dim, dim=2)). The MLP's
    c_fc (32 -> 128) is scaled by sqrt(128/32) = 2 as the linear map it is, not by its stored (32, 128) shape."""
    check(tiny_model("gpt2"), {"attn.c_attn.weight": (True, concatenated(32, 32, 32)),
                               "mlp.c_fc.weight": (True, concatenated(128)),
                               "mlp.c_proj.weight": (True, concatenated(32))})


def test_split_none_orthogonalises_the_whole_fused_weight():
    check(tiny_model("gpt2"), {"attn.c_attn.weight": (True, concatenated(96))}, ns_split="none")


def test_phi3_qkv_proj_with_grouped_kv_heads_and_gate_up_proj():
    """Phi-3: qkv_proj = [q (4 heads x 8); k (2 x 8); v (2 x 8)], gate_up_proj = [gate (48); up (48)]."""
    check(tiny("phi3", num_key_value_heads=2),
          {"qkv_proj.weight": (False, concatenated(32, 16, 16)), "gate_up_proj.weight": (False, concatenated(48, 48))})


def test_gpt_neox_query_key_value_is_interleaved_per_head():
    """GPT-NeoX: view(..., heads, 3 * head_dim): head h's q, k, v rows one after the other; 'heads' cuts per head."""
    per_head = [[h * 24 + j * 8 + i for h in range(4) for i in range(8)] for j in range(3)]
    check(tiny("gpt_neox"), {"query_key_value.weight": (False, per_head)})
    heads = [[h * 24 + j * 8 + i for i in range(8)] for j in range(3) for h in range(4)]
    check(tiny("gpt_neox"), {"query_key_value.weight": (False, heads)}, ns_split="heads")


def test_gpt_oss_experts_are_transposed_and_gate_up_interleaved_by_column():
    """gpt-oss stores experts (E, in, out) and gate_up_proj's outputs interleaved (gate = [..., ::2], up = [..., 1::2]);
    down_proj (E, 48, 32) is the 32 x 48 map, scaled by 1, not sqrt(48/32)."""
    model = tiny("gpt_oss", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                 layer_types=["full_attention"])
    interleaved = [list(range(0, 96, 2)), list(range(1, 96, 2))]
    check(model, {"experts.gate_up_proj": (True, interleaved), "experts.down_proj": (True, concatenated(32))})
    report = solve_report(model, BADMConfig(preconditioner="newton_schulz"))
    biases = [r.name for r, solve in report.routes if "proj_bias" in r.name]
    assert biases and all(solve == "normalized" for r, solve in report.routes if r.name in biases)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_fused_expert_gate_up_steps_gate_and_up_apart(family):
    """transformers 5's concatenated experts: gate_up_proj (E, 2I, H) is [gate; up] per expert (chunk(2))."""
    model = tiny_model(family)
    rows = next(p.shape[1] for n, p in model.named_parameters() if n.endswith("gate_up_proj"))
    check(model, {"experts.gate_up_proj": (False, concatenated(rows // 2, rows // 2))})


class Custom(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        self.table = torch.nn.Parameter(torch.randn(8, 8))  # a custom module's 2-D tensor: not a known linear map
        self.conv = torch.nn.Conv1d(8, 8, 3, groups=8)
        self.attention = torch.nn.MultiheadAttention(8, 2)  # in_proj_weight: q, k and v of 8 rows each (chunk(3))

    def forward(self, x):
        return self.linear(x) @ self.table


def test_an_unknown_2d_tensor_is_named_and_left_elementwise():
    report = solve_report(Custom(), BADMConfig(preconditioner="newton_schulz"))
    routes = {r.name: (r.role, solve) for r, solve in report.routes}
    assert routes["table"] == ("unknown", "normalized") and routes["conv.weight"] == ("conv", "normalized")
    assert routes["linear.weight"] == ("linear", "newton_schulz")
    assert routes["attention.in_proj_weight"] == ("linear", "newton_schulz")
    assert next(r.parts for r, _ in report.routes if r.name == "attention.in_proj_weight") == ("q", "k", "v")
    assert report.unrecognised == ("table",)
    line = str(report)
    assert "\n" not in line and "1 not recognised (left elementwise): table" in line
    listing = report.listing().splitlines()
    assert listing[0].split("\t") == ["name", "shape", "role", "solve", "parts"] and len(listing) == 10


def test_overrides_route_by_name_and_a_pattern_that_matches_nothing_is_refused():
    model = tiny_model("mixtral")
    config = BADMConfig(preconditioner="newton_schulz", solve_overrides=r"mlp\.gate\.=elementwise;experts=whole")
    routes = {r.name: (r, solve) for r, solve in solve_report(model, config).routes}
    router = next(r for n, r in routes.items() if n.endswith("mlp.gate.weight"))
    assert router[0].role == "router" and router[1] == "normalized"
    assert all(not r.parts for n, (r, _) in routes.items() if "experts" in n)
    with pytest.raises(ValueError, match="matches no trainable parameter") as err:
        badm_param_groups(model, 0.0, config=BADMConfig(preconditioner="newton_schulz", solve_overrides="nonesuch=whole"))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="cannot be orthogonalised"):
        solve_report(model, BADMConfig(preconditioner="newton_schulz", solve_overrides="norm=matrix"))
    with pytest.raises(ValueError, match="regex=action"):
        BADMConfig(preconditioner="newton_schulz", solve_overrides="norm=sideways")
