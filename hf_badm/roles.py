"""What each trainable tensor of a model is, read from its module and its name (the shape is a check, not the rule),
and so which local solve it takes: the orthogonalising one (Newton-Schulz) acts on linear maps only.

Roles. Linear maps: ``linear`` (the weight of an ``nn.Linear`` or transformers' ``Conv1D``, stored (in, out)),
``experts`` (a stack of expert maps in a module transformers marks with ``is_transposed`` / ``is_concatenated``:
``(E, out, in)`` or ``(E, in, out)``), ``router`` (an MoE router's weight: a linear map to the expert logits,
orthogonalised as Moonlight's Muon does; ``solve_overrides`` moves it) and ``adapter`` (PEFT LoRA's A and B, each an
``nn.Linear``). Everything else takes the elementwise solve: ``embedding`` (input and output embeddings, the LM
head), ``norm``, ``bias`` (of any rank: gpt-oss's expert biases are 2-D), ``conv`` (convolution kernels, e.g. the
depthwise ``conv1d`` of state-space and linear-attention layers), ``state_space`` (``A_log``, ``D``, ``dt_bias``...),
``vector`` (any other 1-D tensor) and ``unknown``: a 2-D or 3-D tensor nothing here recognises (a position table, a
custom module's weight) is never guessed into Newton-Schulz; the report names it.

Fused projections (several maps in one weight: GPT-2's ``c_attn``, Phi-3's ``qkv_proj``, GPT-NeoX's per-head
interleaved ``query_key_value``, gpt-oss's column-interleaved expert ``gate_up_proj``...) are split into their parts,
each orthogonalised and scaled as the layer it would be in a model with separate projections (Llama's layout):
:data:`FUSED` holds each family's layout, read from its modeling file; ``split="heads"`` cuts attention parts per
head, ``split="none"`` keeps each weight whole. docs/families.md lists what is known of every family.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from hf_badm.optim.solves.newton_schulz import WHOLE, MatrixView
from hf_badm.parallel.shapes import full_shape

__all__ = ["TensorRole", "tensor_roles", "MATRIX_ROLES", "SPLITS", "OVERRIDE_ACTIONS", "parse_overrides", "FUSED",
           "FUSED_MODULES"]

MATRIX_ROLES = ("linear", "experts", "router", "adapter")  # linear maps: the orthogonalising solve takes them
SPLITS = ("parts", "heads", "none")
# solve_overrides actions: orthogonalise (with the run's split, or whole / by parts / by heads), or elementwise
OVERRIDE_ACTIONS = ("matrix", "whole", "parts", "heads", "elementwise")
# Expert modules transformers does not mark (no ``use_experts_implementation``): class -> (stored transposed, gate and up
# concatenated), read from their forward: Llama-4 ``bmm(x, gate_up_proj)`` then ``chunk(2)``; LongCat-Flash
# ``F.linear(x, gate_up_proj[e]).chunk(2)``.
UNMARKED_EXPERTS = {"Llama4TextExperts": (True, True), "LongcatFlashExperts": (False, True)}
STATE_SPACE = frozenset({"A_log", "A", "D", "dt_bias", "dt_proj_bias", "time_decay", "time_first", "time_faaaa"})


@dataclass(frozen=True)
class TensorRole:
    """One trainable tensor: its name and whole shape, its role, whether it takes the orthogonalising solve
    (``matrix``), the maps it holds (``view``) and the labels of its parts (empty: one map per matrix)."""

    name: str
    shape: tuple[int, ...]
    role: str
    matrix: bool
    view: MatrixView = WHOLE
    parts: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------------ fused layouts
Parts = list[tuple[str, list[int]]]  # each part's label and its output rows, in the order they are used
# The head size that split="heads" cuts the parts in: one for every part, each part's own (a part not named stays
# whole: a gate of one row per head is not a head), or None (no heads: the parts are the finest cut).
HeadDims = int | dict[str, int] | None
Builder = Callable[[Any, int], tuple[Parts, HeadDims]]


def _grouped(groups: int, pattern: list[tuple[str, int]]) -> Parts:
    """Output rows laid out as ``groups`` repeats of ``pattern`` (label, rows): each label's rows across the groups,
    in group order. One group: concatenated parts; one per head: interleaved per head; one per column: gpt-oss."""
    rows: dict[str, list[int]] = {label: [] for label, _ in pattern}
    start = 0
    for _ in range(groups):
        for label, size in pattern:
            rows[label] += range(start, start + size)
            start += size
    return list(rows.items())


def _per_head(heads: int, pattern: list[tuple[str, int]]) -> tuple[Parts, dict[str, int]]:
    """``view(..., heads, sum of sizes)`` then ``split(sizes)``: each head's parts one after the other, each part cut
    per head by its own size under split="heads"."""
    return _grouped(heads, pattern), dict(pattern)


def _attention(q: int, kv: int, head_dim: int, groups: int = 1, labels: str = "qkv") -> tuple[Parts, int]:
    """Q, K and V rows of ``q``, ``kv`` and ``kv`` per group (the order of ``labels``), cut per head by ``head_dim``."""
    sizes = dict(zip("qkv", (q, kv, kv)))
    return _grouped(groups, [(label, sizes[label]) for label in labels]), head_dim


def _heads(config: Any) -> tuple[int, int, int]:
    """(attention heads, key-value heads, head dim) of a config, by whichever names the family uses."""
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head", "n_heads")
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return heads, kv, head_dim


def _first(config: Any, *names: str) -> int:
    return next(getattr(config, n) for n in names if getattr(config, n, None) is not None)


def _gpt2_c_attn(config: Any, rows: int) -> tuple[Parts, int]:
    """GPT-2/ImageGPT ``c_attn`` (Conv1D): ``split(embed_dim, dim=2)`` into q, k, v (self-attention) or k, v (the
    cross-attention's), concatenated."""
    heads, _, head_dim = _heads(config)
    labels = "qkv" if rows == 3 * heads * head_dim else "kv"
    return _grouped(1, [(label, heads * head_dim) for label in labels]), head_dim


def _gpt_bigcode_c_attn(config: Any, rows: int) -> tuple[Parts, int]:
    """GPT-BigCode ``c_attn``: multi-query ``split((embed_dim, kv_dim, kv_dim))`` with kv_dim = head_dim; otherwise
    ``view(..., heads, 3 * head_dim)``: per head (q, k, v)."""
    heads, _, head_dim = _heads(config)
    if config.multi_query:
        return _attention(heads * head_dim, head_dim, head_dim)
    return _attention(head_dim, head_dim, head_dim, groups=heads)


def _phi3_qkv(config: Any, rows: int) -> tuple[Parts, int]:
    """Phi-3 ``qkv_proj``: ``[..., :q_pos]``, then ``num_key_value_heads * head_dim`` each for k and v."""
    heads, kv, head_dim = _heads(config)
    return _attention(heads * head_dim, kv * head_dim, head_dim)


def _mpt_or_dbrx_qkv(config: Any, rows: int) -> tuple[Parts, int]:
    """MPT ``Wqkv`` (``chunk(3)``) and DBRX ``Wqkv`` (``split([d_model, kv, kv])``): concatenated."""
    attn = getattr(config, "attn_config", None)
    kv_heads = getattr(attn, "kv_n_heads", None) or getattr(attn, "num_key_value_heads", None)
    heads, _, head_dim = _heads(config)
    return _attention(heads * head_dim, (kv_heads or heads) * head_dim, head_dim)


def _per_head_qkv(config: Any, rows: int) -> tuple[Parts, int]:
    """GPT-NeoX, Persimmon, Bloom ``query_key_value``, MiniMax's lightning attention ``qkv_proj``: ``view(..., heads,
    3 * head_dim)`` (or (heads, 3, head_dim)): each head's q, k and v rows one after the other."""
    heads, _, head_dim = _heads(config)
    return _attention(head_dim, head_dim, head_dim, groups=heads)


def _falcon_qkv(config: Any, rows: int) -> tuple[Parts, int]:
    """Falcon ``query_key_value``, ``_split_heads``: new decoder architecture, per key-value group
    ``[heads/kv q heads, k, v]``; multi-query ``[heads q; k; v]``; otherwise per head (q, k, v)."""
    heads, _, head_dim = _heads(config)
    if config.new_decoder_architecture:
        kv = config.num_kv_heads
        return _attention(heads // kv * head_dim, head_dim, head_dim, groups=kv)
    if config.multi_query:
        return _attention(heads * head_dim, head_dim, head_dim)
    return _attention(head_dim, head_dim, head_dim, groups=heads)


def _codegen_qkv(config: Any, rows: int) -> tuple[Parts, int]:
    """CodeGen ``qkv_proj``: ``reshape(..., mp_num=4, -1)`` then ``split(local_dim)`` as query, value, key."""
    heads, _, head_dim = _heads(config)
    local = heads * head_dim // 4
    return _attention(local, local, local, groups=4, labels="qvk")


def _halves(first: str, second: str) -> Callable[[Any, int], tuple[Parts, None]]:
    """Two concatenated halves (``chunk(2, dim=-1)``): a fused MLP's gate and up, K and V, Mamba's x and z."""
    return lambda config, rows: (_grouped(1, [(first, rows // 2), (second, rows // 2)]), None)


_gate_up = _halves("gate", "up")


def _mamba_x_proj(config: Any, rows: int) -> tuple[Parts, None]:
    """Mamba ``x_proj``: ``split([time_step_rank, state, state])``: dt, B and C."""
    state = _first(config, "state_size", "mamba_d_state")
    return _grouped(1, [("dt", rows - 2 * state), ("B", state), ("C", state)]), None


def _mamba2_in_proj(config: Any, rows: int) -> tuple[Parts, None]:
    """Mamba-2 ``in_proj``: ``split([d_inner, conv_dim, heads])``: the gate z, x with B and C, and dt."""
    heads = _first(config, "mamba_n_heads", "mamba_num_heads", "num_heads", "n_mamba_heads")
    groups = _first(config, "mamba_n_groups", "n_groups", "mamba_ngroups")
    state = _first(config, "mamba_d_state", "state_size", "ssm_state_size")
    inner = (rows - heads - 2 * groups * state) // 2
    return _grouped(1, [("z", inner), ("xBC", inner + 2 * groups * state), ("dt", heads)]), None


def _mla_kv_a(config: Any, rows: int) -> tuple[Parts, None]:
    """MLA ``kv_a_proj_with_mqa``: ``split([kv_lora_rank, qk_rope_head_dim])``: the KV latent and the shared rope key."""
    return _grouped(1, [("c_kv", config.kv_lora_rank), ("k_rope", config.qk_rope_head_dim)]), None


def _mla_kv_b(config: Any, rows: int) -> tuple[Parts, dict[str, int]]:
    """MLA ``kv_b_proj``: ``view(..., heads, nope + v)`` then split: per head [k_nope; v]."""
    return _per_head(config.num_attention_heads, [("k", config.qk_nope_head_dim), ("v", config.v_head_dim)])


def _gated_q(config: Any, rows: int) -> tuple[Parts, dict[str, int]]:
    """Qwen3-Next/3.5, Qwen4-exp gated attention ``q_proj``: ``view(..., -1, head_dim * 2)`` then ``chunk(2)``: per
    head [q; gate]."""
    heads, _, head_dim = _heads(config)
    return _per_head(heads, [("q", head_dim), ("gate", head_dim)])


def _axk2_q_gate(config: Any, rows: int) -> tuple[Parts, dict[str, int]]:
    """AXK2 ``q_gate_proj``: ``view(..., heads, qk_head_dim + v_head_dim)`` then ``split``: per head [q; gate]. The
    query's nope and rope columns stay one part: they are one query head (one dot product with the key)."""
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    return _per_head(config.num_attention_heads, [("q", qk), ("gate", config.v_head_dim)])


def _gdn_dims(config: Any) -> tuple[int, int, int, int]:
    """Gated DeltaNet's (key heads, key head dim, value heads, value head dim)."""
    return (config.linear_num_key_heads, config.linear_key_head_dim, config.linear_num_value_heads,
            config.linear_value_head_dim)


def _gdn_qkv(config: Any, rows: int) -> tuple[Parts, dict[str, int]]:
    """Gated DeltaNet ``in_proj_qkv`` (Qwen3.5, Qwen4-exp, Lara-mini): ``split([key_dim, key_dim, value_dim])``; q and
    k in heads of linear_key_head_dim, v of linear_value_head_dim."""
    kh, kd, vh, vd = _gdn_dims(config)
    return _grouped(1, [("q", kh * kd), ("k", kh * kd), ("v", vh * vd)]), {"q": kd, "k": kd, "v": vd}


def _gdn_qkvz(config: Any, rows: int) -> tuple[Parts, dict[str, int]]:
    """Qwen3-Next ``in_proj_qkvz`` (``fix_query_key_value_ordering``): ``view(..., key heads, -1)`` then ``split([kd,
    kd, r * vd, r * vd])`` with r value heads per key head: q, k, v and the output gate z interleaved per key head."""
    kh, kd, vh, vd = _gdn_dims(config)
    return _grouped(kh, [("q", kd), ("k", kd), ("v", vh // kh * vd), ("z", vh // kh * vd)]), \
        {"q": kd, "k": kd, "v": vd, "z": vd}


def _gdn_ba(config: Any, rows: int) -> tuple[Parts, None]:
    """Qwen3-Next ``in_proj_ba``: ``view(..., key heads, -1)`` then ``split([r, r])``: each value head's b (beta) and a
    (decay) logits, interleaved per key head; one row per head, so no per-head cut."""
    kh, _, vh, _ = _gdn_dims(config)
    return _grouped(kh, [("b", vh // kh), ("a", vh // kh)]), None


def _qwen4_index_qk(config: Any, rows: int) -> tuple[Parts, int]:
    """Qwen4-exp indexer ``index_qk_proj``: ``split([indexer heads, indexer kv heads] x indexer_head_dim)``: its
    queries and keys."""
    return _attention(config.indexer_n_heads * config.indexer_head_dim, config.indexer_kv_heads * config.indexer_head_dim,
                      config.indexer_head_dim, labels="qk")


def _zamba_in_proj(config: Any, rows: int) -> tuple[Parts, int]:
    """Zamba ``in_proj``: ``view(batch, -1, 2, seq).chunk(2, dim=2)``: x and the gate z interleaved row by row, each
    in ``n_mamba_heads`` heads that scan independently."""
    inner = config.mamba_expand * config.hidden_size
    return _grouped(inner, [("x", 1), ("z", 1)]), inner // config.n_mamba_heads


def _xlstm_qkvo(config: Any, rows: int) -> tuple[Parts, dict[str, int]]:
    """xLSTM (weight_mode="fused") ``qkv_opreact``: ``tensor_split`` at qk, 2 qk, 2 qk + v: q, k, v and the output
    gate, each in num_heads heads."""
    qk, v, heads = int(config.hidden_size * config.qk_dim_factor), int(config.hidden_size * config.v_dim_factor), \
        config.num_heads
    return _grouped(1, [("q", qk), ("k", qk), ("v", v), ("o", v)]), \
        {"q": qk // heads, "k": qk // heads, "v": v // heads, "o": v // heads}


def _split_at(first: str, second: str, size: Callable[[Any], int]) -> Builder:
    """Two concatenated parts of ``size(config)`` rows each, cut as ``x[..., :size]``, ``x[..., size:]``."""
    return lambda config, rows: (_grouped(1, [(first, size(config)), (second, size(config))]), None)


# Where the module holding the projection, not the family, tells the layout (DeepSeek-V4's compressors of both kinds
# are ``self_attn.compressor``): (class of the projection's owner, the projection's attribute) -> builder. The
# compressed sparse attention's compressor and its indexer project to two series (kv and their softmax gates):
# ``[..., :head_dim]`` pools into the next window (Ca), ``[..., head_dim:]`` into its own (Cb). The heavily compressed
# attention's compressor projects one series (head_dim rows): nothing to split.
FUSED_MODULES: dict[tuple[str, str], Builder] = {
    **{("DeepseekV4CSACompressor", proj): _split_at("a", "b", lambda c: c.head_dim) for proj in ("kv_proj", "gate_proj")},
    **{("DeepseekV4Indexer", proj): _split_at("a", "b", lambda c: c.index_head_dim) for proj in ("kv_proj", "gate_proj")},
}


# (model_type, the weight's name ending) -> its parts from the config and its output rows, and the head size.
# Left whole, as one map: a query cut in nope and rope columns (MLA q_proj/q_b_proj, the DSA indexers' wq_b): both
# halves form one query head, one dot product with one key; zamba's per-head x_proj_weight/dt_proj_weight are not
# nn.Linear weights (named, elementwise: solve_overrides can route them).
FUSED: dict[tuple[str, str], Builder] = {
    ("gpt2", "attn.c_attn.weight"): _gpt2_c_attn,
    ("gpt2", "crossattention.c_attn.weight"): _gpt2_c_attn,
    ("imagegpt", "attn.c_attn.weight"): _gpt2_c_attn,
    ("openai-gpt", "attn.c_attn.weight"): _gpt2_c_attn,
    ("gpt_bigcode", "attn.c_attn.weight"): _gpt_bigcode_c_attn,
    ("phi3", "qkv_proj.weight"): _phi3_qkv,
    ("phi3", "gate_up_proj.weight"): _gate_up,
    ("phi4_multimodal", "self_attn.qkv_proj.weight"): _phi3_qkv,
    ("phi4_multimodal", "feed_forward_in.gate_up_proj.weight"): _halves("up", "gate"),  # the audio MLP: chunk(2) = up, gate
    ("phi4_multimodal", "feed_forward_out.gate_up_proj.weight"): _halves("up", "gate"),
    ("phi4_multimodal", "gate_up_proj.weight"): _gate_up,
    ("glm", "gate_up_proj.weight"): _gate_up,
    ("glm4", "gate_up_proj.weight"): _gate_up,
    ("minimax_m3_vl_text", "gate_up_proj.weight"): _gate_up,
    ("zamba2", "mlp.gate_up_proj.weight"): _gate_up,
    ("mpt", "attn.Wqkv.weight"): _mpt_or_dbrx_qkv,
    ("dbrx", "attn.Wqkv.weight"): _mpt_or_dbrx_qkv,
    ("gpt_neox", "query_key_value.weight"): _per_head_qkv,
    ("gpt_neox_japanese", "query_key_value.weight"): _per_head_qkv,
    ("persimmon", "query_key_value.weight"): _per_head_qkv,
    ("bloom", "query_key_value.weight"): _per_head_qkv,
    ("falcon", "query_key_value.weight"): _falcon_qkv,
    ("codegen", "qkv_proj.weight"): _codegen_qkv,
    ("minimax", "qkv_proj.weight"): _per_head_qkv,
    ("jetmoe", "kv_proj.weight"): _halves("k", "v"),
    ("modernbert-decoder", "mlp.Wi.weight"): _halves("input", "gate"),  # chunk(2): act(input) * gate
    ("moshi", "mlp.fc1.weight"): _gate_up,  # view(..., 2, -1): act([..., 0, :]) * [..., 1, :]
    ("axk2", "self_attn.q_gate_proj.weight"): _axk2_q_gate,
    ("qwen3_next", "linear_attn.in_proj_qkvz.weight"): _gdn_qkvz,
    ("qwen3_next", "linear_attn.in_proj_ba.weight"): _gdn_ba,
    **{(family, "indexer.index_qk_proj.weight"): _qwen4_index_qk for family in ("qwen4_exp", "qwen4_exp_text")},
    ("zamba", "mamba.in_proj.weight"): _zamba_in_proj,
    # xLSTM with weight_mode="fused" (the default "single" keeps q, k, v, the gates and the MLP's halves apart)
    ("xlstm", "mlstm_layer.qkv_opreact.weight"): _xlstm_qkvo,
    ("xlstm", "mlstm_layer.ifgate_preact.weight"): _split_at("i", "f", lambda c: c.num_heads),
    ("xlstm", "ffn.proj_up_gate_z.weight"): _halves("gate", "z"),
    **{(family, "shared_mlp.input_linear.weight"): _gate_up
       for family in ("granitemoehybrid", "granitemoeshared", "granitemoe_swa")},
    **{(family, "in_proj.weight"): _halves("x", "z") for family in ("mamba", "falcon_mamba", "jamba")},
    **{(family, "x_proj.weight"): _mamba_x_proj for family in ("mamba", "falcon_mamba", "jamba")},
    **{(family, "in_proj.weight"): _mamba2_in_proj
       for family in ("mamba2", "nemotron_h", "bamba", "falcon_h1", "granitemoehybrid", "zamba2")},
    **{(family, "self_attn.kv_a_proj_with_mqa.weight"): _mla_kv_a for family in (
        "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa", "kimi_linear", "longcat_flash",
        "minicpm3", "youtu", "sarvam_mla", "axk1", "axk2", "bailing_hybrid", "hy_v4", "dots3_note",
        "dots3_note_text")},
    **{(family, "self_attn.kv_b_proj.weight"): _mla_kv_b for family in (
        "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa", "kimi_linear", "longcat_flash",
        "minicpm3", "youtu", "sarvam_mla", "axk1", "axk2", "bailing_hybrid", "hy_v4", "dots3_note",
        "dots3_note_text")},
    **{(family, "self_attn.q_proj.weight"): _gated_q for family in (
        "qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen4_exp", "qwen4_exp_text")},
    **{(family, "linear_attn.in_proj_qkv.weight"): _gdn_qkv for family in (
        "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen4_exp", "qwen4_exp_text", "lara_mini")},
    **{(family, "in_proj.weight"): lambda config, rows: (_grouped(1, [(x, rows // 3) for x in "BCx"]), None)
       for family in ("lfm2", "lfm2_moe", "lfm3")},
}


def _experts_parts(module: nn.Module, attr: str, rows: int) -> tuple[Parts, None]:
    """A fused expert ``gate_up_proj`` (transformers' ``has_gate``): gate and up halves, concatenated or, where the
    module says ``is_concatenated=False`` (gpt-oss), interleaved column by column."""
    if attr != "gate_up_proj" or not getattr(module, "has_gate", True):
        return [], None
    if getattr(module, "is_concatenated", UNMARKED_EXPERTS.get(type(module).__name__, (None, True))[1]):
        return _grouped(1, [("gate", rows // 2), ("up", rows // 2)]), None
    return _grouped(rows // 2, [("gate", 1), ("up", 1)]), None


def _cut_heads(parts: Parts, head_dim: HeadDims) -> Parts:
    """Each part cut in heads of its :data:`HeadDims` size (a part without one stays whole)."""
    out: Parts = []
    for label, rows in parts:
        size = head_dim.get(label) if isinstance(head_dim, dict) else head_dim
        out += [(f"{label}{h}", rows[h * size:(h + 1) * size]) for h in range(len(rows) // size)] if size else \
            [(label, rows)]
    return out


def _view(transposed: bool, parts: Parts, head_dim: HeadDims, split: str) -> tuple[MatrixView, tuple[str, ...]]:
    """The :class:`MatrixView` of a weight with these parts under ``split``, and the parts' labels."""
    if split == "none" or len(parts) < 2:
        return MatrixView(transposed=transposed), ()
    if split == "heads" and head_dim:
        parts = _cut_heads(parts, head_dim)
    order = tuple(r for _, rows in parts for r in rows)
    return (MatrixView(transposed=transposed, order=None if order == tuple(range(len(order))) else order,
                       sizes=tuple(len(rows) for _, rows in parts)), tuple(label for label, _ in parts))


# ------------------------------------------------------------------------------------------------ classification
def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or \
        "norm" in type(module).__name__.lower()


def _is_conv1d_linear(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family): a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _embedding_ids(model: nn.Module) -> set[int]:
    """Input/output embedding matrices: 2-D, but rows are tokens, not a linear map to orthogonalise."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        if module is not None and getattr(module, "weight", None) is not None:
            ids.add(id(module.weight))
    return ids


def _role(name: str, module: nn.Module, attr: str, dims: int, embedding: bool) -> tuple[str, bool]:
    """(role, stored transposed) of the tensor ``attr`` of ``module``."""
    kind = type(module).__name__
    if embedding or isinstance(module, nn.Embedding) or "Embedding" in kind:
        return "embedding", False
    if attr in STATE_SPACE:
        return "state_space", False
    if "bias" in attr:
        return "bias", False
    if _is_norm(module):
        return "norm", False
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv", False
    if attr == "weight" and dims == 2 and isinstance(module, nn.Linear):
        return ("adapter" if re.search(r"\.lora_[AB]\.", name) else "linear"), False
    if attr == "weight" and dims == 2 and _is_conv1d_linear(module):
        return "linear", True
    if isinstance(module, nn.MultiheadAttention) and attr.endswith("proj_weight") and dims == 2:
        return "linear", False  # torch's attention: in_proj_weight holds q, k and v (or q/k/v_proj_weight apart)
    if attr == "weight" and dims == 2 and kind.endswith("Router"):
        return "router", False
    if dims == 3 and attr in ("gate_up_proj", "up_proj", "down_proj"):
        if hasattr(module, "is_transposed"):
            return "experts", bool(module.is_transposed)
        if kind in UNMARKED_EXPERTS:
            return "experts", UNMARKED_EXPERTS[kind][0]
    return ("vector" if dims <= 1 else "unknown"), False


def parse_overrides(text: str) -> list[tuple[str, str]]:
    """``solve_overrides``: ``;``-separated ``regex=action`` (action one of :data:`OVERRIDE_ACTIONS`; the regex is
    searched in each parameter name), checked here: a bad regex or action is a ValueError naming it."""
    out = []
    for item in (s.strip() for s in text.split(";")):
        if not item:
            continue
        pattern, eq, action = (part.strip() for part in item.rpartition("="))
        if not eq or not pattern or action not in OVERRIDE_ACTIONS:
            raise ValueError(f"solve_overrides takes ';'-separated regex=action with action one of {OVERRIDE_ACTIONS}, "
                             f"got {item!r}")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"solve_overrides: {pattern!r} is not a regular expression ({err})") from None
        out.append((pattern, action))
    return out


def tensor_roles(model: nn.Module, split: str = "parts", overrides: str = "") -> dict[str, TensorRole]:
    """The :class:`TensorRole` of every trainable parameter of ``model`` (by name, in ``named_parameters`` order).
    ``split``: how fused projections are cut (:data:`SPLITS`). ``overrides``: :func:`parse_overrides`'s text, applied
    after the rules (the last matching pattern wins); a pattern that matches no trainable tensor, or that makes a
    tensor that is not 2-D or 3-D a matrix, or splits one that has no known parts, is a ValueError naming it."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    modules = dict(model.named_modules())
    embeddings = _embedding_ids(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    config = getattr(model, "config", None)
    rules = parse_overrides(overrides)
    matched = dict.fromkeys(pattern for pattern, _ in rules)
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner, _, attr = name.rpartition(".")
        module, shape = modules[owner], tuple(full_shape(p))
        role, transposed = _role(name, module, attr, len(shape), id(p) in embeddings)
        rows = shape[-1] if transposed else (shape[-2] if len(shape) > 1 else 0)
        parent, _, proj = owner.rpartition(".")
        parts, head_dim = _parts(model_type, config, name, module, attr, role, rows, (type(modules[parent]).__name__, proj))
        action = "matrix" if role in MATRIX_ROLES else "elementwise"
        for pattern, chosen in rules:
            if re.search(pattern, name):
                matched[pattern], action = name, chosen
        if action == "elementwise":
            out[name] = TensorRole(name, shape, role, False)
            continue
        if len(shape) not in (2, 3):
            raise ValueError(f"solve_overrides: {name} ({role}, shape {shape}) is not a matrix or a stack of matrices: "
                             "it cannot be orthogonalised")
        how = split if action == "matrix" else {"whole": "none"}.get(action, action)
        if how != "none" and action != "matrix" and not parts:
            raise ValueError(f"solve_overrides: {name} has no known fused parts to split ({action!r}): use 'whole'")
        view, labels = _view(transposed, parts, head_dim, how)
        out[name] = TensorRole(name, shape, role, True, view, labels)
    unmatched = [pattern for pattern, hit in matched.items() if hit is None]
    if unmatched:
        raise ValueError(f"solve_overrides: {unmatched[0]!r} matches no trainable parameter name (see hf_badm."
                         "solve_report(model, config).listing() for the names)")
    return out


def _parts(model_type: str | None, config: Any, name: str, module: nn.Module, attr: str, role: str, rows: int,
           holder: tuple[str, str]) -> tuple[Parts, HeadDims]:
    """A fused weight's parts (:data:`FUSED_MODULES` by the class holding the projection, :data:`FUSED` by family and
    name, or the experts module's own flags), checked against its rows. ``holder``: (the class of the module holding
    the projection, the projection's attribute)."""
    if role == "experts":
        parts, head_dim = _experts_parts(module, attr, rows)
    elif isinstance(module, nn.MultiheadAttention) and attr == "in_proj_weight":
        # F.multi_head_attention_forward: in_proj_weight.chunk(3) (q, k, v), embed_dim rows each
        parts, head_dim = _grouped(1, [(label, module.embed_dim) for label in "qkv"]), module.head_dim
    else:
        builder = FUSED_MODULES.get(holder) or next(
            (b for (family, end), b in FUSED.items() if family == model_type and name.endswith(end)), None)
        if builder is None or role != "linear":
            return [], None
        parts, head_dim = builder(config, rows)
    if parts and sum(len(r) for _, r in parts) != rows:
        raise ValueError(f"{name}: its family's fused layout gives {sum(len(r) for _, r in parts)} output rows, the "
                         f"weight has {rows}: this transformers stores it differently; set ns_split='none'")
    return parts, head_dim

