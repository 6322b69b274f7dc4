"""What a tensor is decides its solve (hf_badm.roles): fused projections step part by part, each part's step checked
against a literal per-part Muon step in float64 (the layouts written out here from the modeling files, independently
of hf_badm.roles.FUSED); unknown tensors are named and left elementwise; name overrides are checked at start-up."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from hf_badm import BADM, BADMConfig
from families import build_tiny, instantiate, tiny_batch, tiny_config
from hf_badm.factory import badm_param_groups, solve_report
from hf_badm.roles import tensor_roles
from reference import newton_schulz5, normuon_rows
from tiny import tiny_model

LR, MU = 0.05, 0.95


def tiny(model_type: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=48, max_position_embeddings=64, pad_token_id=0,
                                  **extra)
    return AutoModelForCausalLM.from_config(config)


def first_step(model: torch.nn.Module, **config) -> tuple[dict, dict, dict]:
    """One fused newton_schulz step at rho = sigma in float64 (the momentum is the gradient): before, grads, after.
    A tensor the text forward does not reach (an audio tower's) gets a seeded random gradient, so it steps too."""
    model = model.double()
    if any(p.dim() == 3 for p in model.parameters()):
        model.set_experts_implementation("eager")
    cfg = BADMConfig(**{"preconditioner": "newton_schulz", "sigma": 1 / LR, "ns_dtype": "float64", **config})
    opt = BADM(badm_param_groups(model, 0.0, config=cfg), **cfg.optimizer_kwargs(LR))
    model(**tiny_batch(model)).loss.backward()
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return before, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def literal_step(g: torch.Tensor, parts: list[list[int]], normuon: bool = False) -> torch.Tensor:
    """Muon's first step on a (rows x in) map whose output rows hold ``parts``: each part NS5 on its own, scaled by
    sqrt(max(1, part rows / in)), written back to its rows. ``normuon``: NorMuon's first step on each part, as on a
    layer of its own (its rows' RMS divided out, the part's Frobenius norm restored)."""
    out = torch.zeros_like(g)
    for rows in parts:
        o = newton_schulz5((1 + MU) * g[rows])
        if normuon:
            o, _ = normuon_rows(o, torch.zeros(len(rows), 1, dtype=o.dtype))
        out[rows] = -LR * o * math.sqrt(max(1.0, len(rows) / g.shape[1]))
    return out


def check(model: torch.nn.Module, expected_parts: dict[str, tuple[bool, list[list[int]]]], **config) -> None:
    """Each named weight (``transposed``: stored (in, out); its parts' output rows) steps by the literal per-part
    step, within 1e-10 relative (float64); expert stacks slice by slice."""
    before, grads, after = first_step(model, **config)
    normuon = config.get("preconditioner") == "normuon"
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
                expected = literal_step(m, parts, normuon)
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


def test_normuon_restores_each_parts_norm_as_a_layer_of_its_own():
    """normuon on fused projections: GPT-2's c_attn (stored transposed), Phi-3's unequal q/k/v parts and GPT-NeoX's
    per-head interleaving step as NorMuon steps separate q, k and v layers."""
    check(tiny_model("gpt2"), {"attn.c_attn.weight": (True, concatenated(32, 32, 32))}, preconditioner="normuon")
    check(tiny("phi3", num_key_value_heads=2), {"qkv_proj.weight": (False, concatenated(32, 16, 16))},
          preconditioner="normuon")
    per_head = [[h * 24 + j * 8 + i for h in range(4) for i in range(8)] for j in range(3)]
    check(tiny("gpt_neox"), {"query_key_value.weight": (False, per_head)}, preconditioner="normuon")


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


# ------------------------------------------------------------------------------------------------ more fused layouts
# Each layout is written here as its modeling file cuts the projection's output (the module's own split where it is a
# method, else the same view/split on the output indices), independently of hf_badm.roles.FUSED; the view must yield
# exactly those rows, and one step must equal the literal per-part Muon step.
def fused(model: torch.nn.Module, layouts: dict[str, list[torch.Tensor]], split: str = "parts") -> None:
    """``layouts``: weight-name ending -> each part's output rows (index tensors, as forward cuts them)."""
    roles = tensor_roles(model, split)
    for suffix, rows in layouts.items():
        names = [n for n in roles if n.endswith(suffix)]
        assert names, suffix
        for name in names:
            w = model.get_parameter(name).detach()
            maps = roles[name].view.maps(w)
            assert len(maps) == len(rows) and all(torch.equal(m, w[r]) for m, r in zip(maps, rows)), name
    check(model, {suffix: (False, [r.tolist() for r in rows]) for suffix, rows in layouts.items()}, ns_split=split)


def outputs(layer: torch.nn.Module, proj: str) -> torch.Tensor:
    """The output indices of ``layer.<proj>``, as forward's view/split sees its output."""
    return torch.arange(getattr(layer, proj).out_features)


def layer_of(model: torch.nn.Module, cls: str) -> torch.nn.Module:
    return next(m for m in model.modules() if type(m).__name__ == cls)


@pytest.mark.parametrize("split", ["parts", "heads"])
def test_qwen3_next_in_proj_qkvz_and_ba_are_interleaved_per_key_head(split):
    """Qwen3-Next's gated DeltaNet: the module's own fix_query_key_value_ordering, run on the output indices, cuts
    in_proj_qkvz into q, k, v, z and in_proj_ba into b, a (2 key heads, 4 value heads: 2 value heads per key head)."""
    model = build_tiny("qwen3_next")
    layer = layer_of(model, "Qwen3NextGatedDeltaNet")
    assert layer.num_v_heads // layer.num_k_heads == 2
    q, k, v, z, b, a = layer.fix_query_key_value_ordering(outputs(layer, "in_proj_qkvz")[None, None],
                                                          outputs(layer, "in_proj_ba")[None, None])
    if split == "parts":
        qkvz = [x.flatten() for x in (q, k, v, z)]
    else:  # each head of q and k (key heads), of v and z (value heads)
        qkvz = [head for x in (q, k, v, z) for head in x[0, 0]]
    fused(model, {"in_proj_qkvz.weight": qkvz, "in_proj_ba.weight": [b.flatten(), a.flatten()]}, split)


@pytest.mark.parametrize("family", ["qwen4_exp_text", "lara_mini"])
def test_gated_deltanet_in_proj_qkv_q_gate_and_indexer(family):
    """in_proj_qkv: split([key_dim, key_dim, value_dim]); Qwen4-exp's gated q_proj: view(..., -1, 2 * head_dim).chunk(2);
    its indexer's index_qk_proj: split([heads, kv heads] x head_dim)."""
    model = build_tiny(family)
    gdn = next(m for m in model.modules() if hasattr(m, "in_proj_qkv"))
    layouts = {"in_proj_qkv.weight": list(torch.split(outputs(gdn, "in_proj_qkv"), [gdn.key_dim, gdn.key_dim,
                                                                                     gdn.value_dim]))}
    if family == "qwen4_exp_text":
        attn = next(m for m in model.modules() if hasattr(m, "indexer"))
        q, gate = torch.chunk(outputs(attn, "q_proj").view(-1, 2 * attn.head_dim), 2, dim=-1)
        index = attn.indexer
        layouts["self_attn.q_proj.weight"] = [q.flatten(), gate.flatten()]
        layouts["index_qk_proj.weight"] = list(torch.split(outputs(index, "index_qk_proj"), [
            index.index_n_heads * index.index_head_dim, index.index_kv_heads * index.index_head_dim]))
    fused(model, layouts)


def test_zamba_in_proj_interleaves_x_and_gate_row_by_row():
    """Zamba's Mamba in_proj: view(batch, -1, 2, seq).chunk(2, dim=2): even rows x, odd rows the gate."""
    model = build_tiny("zamba")
    x, gate = outputs(layer_of(model, "ZambaMambaMixer"), "in_proj").view(-1, 2).unbind(-1)
    fused(model, {"mamba.in_proj.weight": [x, gate]})


@pytest.mark.parametrize("split", ["parts", "heads"])
def test_axk2_q_gate_and_mla_kv_b_are_cut_per_head(split):
    """AXK2's q_gate_proj: view(..., heads, qk_head_dim + v_head_dim).split: per head [q; gate]; MLA kv_b_proj:
    view(..., heads, nope + v).split: per head [k_nope; v]. 'heads' cuts each part per head at its own size."""
    model = build_tiny("axk2")
    attn = next(m for m in model.modules() if hasattr(m, "q_gate_proj"))
    q, gate = outputs(attn, "q_gate_proj").view(attn.num_heads, -1).split([attn.qk_head_dim, attn.v_head_dim], -1)
    k, v = outputs(attn, "kv_b_proj").view(attn.num_heads, -1).split([attn.qk_nope_head_dim, attn.v_head_dim], -1)
    cut = (lambda x: list(x)) if split == "heads" else (lambda x: [x.flatten()])
    fused(model, {"q_gate_proj.weight": cut(q) + cut(gate), "kv_b_proj.weight": cut(k) + cut(v)}, split)


def test_deepseek_v4_compressors_split_their_two_series_and_the_heavy_one_stays_whole():
    """DeepSeek-V4's compressed sparse attention: the compressor's and its indexer's kv_proj and gate_proj outputs are
    [..., :head_dim] (pooled into the next window) and [..., head_dim:] (its own); the heavily compressed attention's
    compressor (the same name, one series) is one map."""
    model = build_tiny("deepseek_v4")
    csa, index = layer_of(model, "DeepseekV4CSACompressor"), layer_of(model, "DeepseekV4Indexer")
    layouts = {f"{i}.self_attn.compressor.{proj}.weight": [outputs(csa, proj)[:csa.head_dim], outputs(csa, proj)[
        csa.head_dim:]] for i, m in enumerate(model.model.layers) if m.self_attn.compressor is csa
        for proj in ("kv_proj", "gate_proj")}
    layouts |= {f"indexer.{proj}.weight": [outputs(index, proj)[:index.head_dim], outputs(index, proj)[index.head_dim:]]
                for proj in ("kv_proj", "gate_proj")}
    fused(model, layouts)
    roles = tensor_roles(model)
    heavy = [n for n, r in roles.items() if "compressor.kv_proj" in n and type(
        model.get_submodule(n.rsplit(".", 2)[0])).__name__ == "DeepseekV4HCACompressor"]
    assert heavy and all(roles[n].matrix and not roles[n].parts for n in heavy)


def test_fused_mlp_halves_modernbert_decoder_moshi_and_phi4_audio():
    """ModernBERT-decoder Wi: chunk(2) = (input, gate); Moshi fc1: view(..., 2, -1) = [0] gated, [1]; Phi-4-MM's
    audio MLP gate_up_proj: chunk(2) = (up, gate)."""
    model = build_tiny("modernbert-decoder")
    fused(model, {"mlp.Wi.weight": list(outputs(layer_of(model, "ModernBertDecoderMLP"), "Wi").chunk(2))})
    model = build_tiny("moshi")
    fused(model, {"mlp.fc1.weight": list(outputs(layer_of(model, "MoshiGatingMLP"), "fc1").view(2, -1))})
    model = build_tiny("phi4_multimodal")
    audio = layer_of(model, "Phi4MultimodalAudioMLP")
    fused(model, {"feed_forward_in.gate_up_proj.weight": list(outputs(audio, "gate_up_proj").chunk(2))})
    assert tensor_roles(model)[next(n for n in tensor_roles(model) if n.endswith("feed_forward_in.gate_up_proj.weight"))
                                ].parts == ("up", "gate")


def test_xlstm_fused_weight_mode_splits_qkvo_gates_and_mlp():
    """xLSTM with weight_mode="fused": qkv_opreact tensor_split at (qk, 2 qk, 2 qk + v); ifgate_preact at num_heads;
    the MLP's proj_up_gate_z at up_proj_dim. transformers 5.24's init of the fused gate bias fails (it adds a 2-heads
    tensor to a heads slice), so the model is built without it and filled with seeded values: the layout and the step
    check do not depend on them."""
    config = tiny_config("xlstm")
    config.weight_mode = "fused"
    with no_init_weights():  # transformers' own switch: no init at all, whichever class's _init_weights
        model = instantiate("xlstm", config)
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p.data, std=0.1)
    layer, ffn = layer_of(model, "xLSTMLayer"), layer_of(model, "xLSTMFeedForward")
    fused(model, {
        "qkv_opreact.weight": list(torch.tensor_split(outputs(layer, "qkv_opreact"), (
            layer.qk_dim, 2 * layer.qk_dim, 2 * layer.qk_dim + layer.v_dim))),
        "ifgate_preact.weight": list(torch.tensor_split(outputs(layer, "ifgate_preact"), (config.num_heads,))),
        "proj_up_gate_z.weight": list(torch.tensor_split(outputs(ffn, "proj_up_gate_z"), (ffn.up_proj_dim,)))})
