"""Tiny builds of every causal-LM family of the installed transformers, for tests that walk each model's tensors.

``causal_lm_families()`` lists the model types of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``; ``build_tiny(model_type)``
builds the ``*ForCausalLM`` class that mapping names from ``AutoConfig.for_model(model_type, **overrides)``, where the
overrides come from one generic shrinker (``tiny_overrides``) that walks the default config and its sub-configs and
sets every size it knows to a small value (keeping one layer of each kind), plus a few explicit, commented
per-family entries: ``DEFAULT_FIXES`` (applied to the default config before shrinking) and ``FAMILY_OVERRIDES``
(applied after). ``tiny_batch(model)`` gives inputs that one forward + backward pass accepts (input_ids and labels,
plus whatever the family needs). ``UNBUILDABLE`` names the families a sweep must skip, with the reason.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import transformers
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16
FFN, MOE_FFN = 128, 32
LAYERS, VOCAB, POSITIONS = 2, 128, 128
EXPERTS, EXPERTS_PER_TOKEN = 4, 2
STATE = 8
BATCH, SEQ = 2, 8

_DRAFTER = ("builds, but is a speculative-decoding drafter: its forward ignores input_ids, requires the target "
            "model's inputs_embeds and shared_kv_states, and returns logits without any loss")

# Families a sweep must skip, with the reason: they cannot be built here, or, built, cannot run the
# input_ids + labels -> loss -> backward step.
UNBUILDABLE: dict[str, str] = {
    "gemma3n": "Gemma3nForConditionalGeneration builds its vision tower as a TimmWrapperModel, which needs the "
               "timm package (not installed); its text stack is covered by gemma3n_text",
    "gemma4_assistant": _DRAFTER,
    "gemma4_unified_assistant": _DRAFTER,
}

# Fixes to a family's default config, applied before the generic shrinker reads it (the default is not a valid or
# not a representative model). A dict value for a sub-config key is merged into that sub-config.
DEFAULT_FIXES: dict[str, dict[str, Any]] = {
    # ReformerModelWithLMHead asserts is_decoder, which defaults to False.
    "reformer": {"is_decoder": True},
    # Empty rope_parameters by default, yet every layer type's rotary embedding reads its own entry.
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    # The attention reads attn_config.rope_theta, which released config.json files carry but the class lacks.
    # Likewise clip_qkv: the attention clamps q/k/v to it unconditionally.
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    # No experts by default (n_routed_experts / num_experts_per_tok None), yet every layer builds an MoE block;
    # these are dots.llm1's released values.
    "dots1": {"n_routed_experts": 128, "num_experts_per_tok": 6, "n_shared_experts": 2, "first_k_dense_replace": 1},
    # MoE families whose defaults switch the routed/shared parts off (shared experts, a dense prefix, the MoE
    # block, the shared MLP): turn them on so the tiny model holds every kind of tensor the family can ship.
    "cohere2_moe": {"num_shared_experts": 1, "first_k_dense_replace": 1},
    "doge": {"is_moe": True},
    "gemma4": {"text_config": {"enable_moe_block": True, "num_experts": 128, "top_k_experts": 8,
                               "moe_intermediate_size": 704}},
    "gemma4_text": {"enable_moe_block": True, "num_experts": 128, "top_k_experts": 8, "moe_intermediate_size": 704},
    "granitemoe_swa": {"shared_intermediate_size": 1024},
    "granitemoeshared": {"shared_intermediate_size": 1024},
    # The assistant's validator rejects its own text_config defaults: it needs no per-layer inputs and every layer
    # reading the target model's KV.
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0,
                                         "num_kv_shared_layers": 30}},
    # By default every layer is attention (full_attn_idxs None); LFM2 checkpoints mix short-conv and attention
    # layers (these are LFM2-1.2B's attention layers).
    "lfm2": {"full_attn_idxs": [2, 5, 8, 10, 12, 14]},
    # layer_types None by default, which the model cannot build; mix conv and attention as LFM2 checkpoints do.
    "lfm2_moe": {"layer_types": ["full_attention" if i % 4 == 3 else "conv" for i in range(32)]},
}

# Explicit per-family overrides, applied on top of the generic shrinker's (same merging). Each says why the
# generic shrinker is not enough.
FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {
    # Attention layers come from attn_layer_indices (None: all Mamba); keep one Mamba and one attention layer.
    "bamba": {"attn_layer_indices": [1]},
    # Sliding layers use per-layer qk_nope_head_dim = head_dim - qk_rope_head_dim (validated); 16 + 8.
    "dots3_note": {"text_config": {"head_dim": 24}},
    "dots3_note_text": {"head_dim": 24},
    # The per-layer pattern comes from a "mlp"-interleaved layer_types and three stack counts that must add up;
    # one input, one looped and one output layer, with both attention kinds.
    "dory": {"num_hidden_layers": 3, "n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1,
             "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    # GIT's loss skips the image tokens, so a batch carries pixel_values: keep the image small.
    "git": {"vision_config": {"image_size": 32, "patch_size": 16}},
    # Layer kinds come from periods (attention every 8th layer from 4, experts every 2nd from 1): with 2 layers,
    # layer 0 is Mamba + MoE and layer 1 attention + dense MLP.
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 0},
    # The default stack is all Mamba (layer_types all "linear_attention"); keep one attention layer.
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    # The indexer sizes have no defaults (None), yet the indexed-attention layers read them.
    "qwen4_exp_text": {"indexer_n_heads": 4, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 4,
                       "indexer_compress_ratio": 2},
    "qwen4_exp": {"text_config": {"indexer_n_heads": 4, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                                  "indexer_budget": 4, "indexer_compress_ratio": 2}},
    # Block-sparse attention only runs when seq_len > (5 + 2 * num_random_blocks) * block_size (else the forward
    # switches the model to full attention for good): blocks of 2 and one random block need 16 tokens (tiny_batch).
    "big_bird": {"block_size": 2, "num_random_blocks": 1},
    # Looped layers span [loop_layer_index_start, loop_layer_index_end), multiples of n_layers_per_attn_res_block:
    # six layers, blocks of 2, loop over layers 2-3, so there are looped and plain layers of both attention kinds.
    "inkling2_loop_text": {"num_hidden_layers": 6, "n_layers_per_attn_res_block": 2, "loop_layer_index_start": 2,
                           "loop_layer_index_end": 4, "layer_types": ["hybrid_sliding", "hybrid_sliding",
                                                                      "hybrid_sliding", "hybrid", "hybrid_sliding",
                                                                      "hybrid"]},
    # block_types is a cyclic pattern (recurrent, recurrent, attention): 2 layers need it as (recurrent, attention).
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    # The axial position table must factor the (training) sequence length, and the chunked local / LSH attention
    # needs chunks that divide it; one layer of each attention kind.
    "reformer": {"attn_layers": ["local", "lsh"], "axial_pos_shape": [2, 4],
                 "axial_pos_embds_dim": [16, 48], "local_attn_chunk_length": 4, "lsh_attn_chunk_length": 4,
                 "num_buckets": 2, "max_position_embeddings": 8},
    # The mLSTM's qk dim rounds hidden_size * qk_dim_factor up to a multiple of 64; 128 keeps it exact.
    "xlstm": {"hidden_size": 128, "embedding_dim": 128},
    # The shared attention block is tied across "hybrid" layers (its tie pattern needs two of them); attention runs
    # on concat(hidden, embeddings), so its head dim is 2 * hidden / heads.
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"],
              "attention_head_dim": 32},
}


def causal_lm_families() -> list[str]:
    """Every model type of the installed transformers' causal-LM auto mapping, sorted."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# ----------------------------------------------------------------------------------------------------------------
# The generic shrinker: key names -> small values. Only keys a config already has are touched.

_HIDDEN_KEYS = {"hidden_size", "n_embd", "d_model", "emb_dim", "embedding_dim", "embedding_size", "word_embed_proj_dim",
                "input_embedding_size", "lru_width", "hidden_size_global", "output_channels", "backbone_hidden_size",
                "embed_dim", "shape_embed_dim", "pronunciation_embed_dim"}
_FFN_KEYS = {"intermediate_size", "ffn_dim", "d_ff", "dff", "dim_ff", "d_inner", "feed_forward_size", "mlp_dim",
             "ffn_hidden_size", "intermediate_size_mlp", "dense_intermediate_size", "decoder_ffn_dim",
             "encoder_ffn_dim", "output_embedding_size", "n_inner"}
_MOE_FFN_KEYS = {"moe_intermediate_size", "shared_expert_intermediate_size", "expert_ffn_hidden_size",
                 "shared_intermediate_size", "shared_experts_intermediate_size",
                 "moe_shared_expert_intermediate_size"}
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers",
               "depth", "num_blocks")
_OTHER_LAYER_KEYS = {"encoder_layers", "num_encoder_layers"}
_HEAD_KEYS = {"num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads", "decoder_attention_heads",
              "encoder_attention_heads", "num_decoder_attention_heads", "num_encoder_attention_heads",
              "swa_num_attention_heads", "index_n_heads", "linear_num_heads"}
_MAIN_HEAD_KEYS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads",
                   "decoder_attention_heads")
_KV_KEYS = {"num_key_value_heads", "num_kv_heads", "kv_n_heads", "num_query_groups", "multi_query_group_num",
            "swa_num_key_value_heads"}
_HEAD_DIM_KEYS = {"head_dim", "attention_head_dim", "attention_head_size", "kv_channels", "dim_head", "d_head", "d_kv",
                  "swa_head_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_head_dim",
                  "index_head_dim", "v_head_dim", "qk_nope_head_dim"}
_POSITION_KEYS = {"max_position_embeddings", "n_positions", "n_ctx", "max_target_positions", "max_source_positions",
                  "max_seq_len", "context_length", "rel_extent", "sliding_window_size"}
_EXPERT_KEYS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "zero_expert_num"}
_TOPK_KEYS = {"num_experts_per_tok", "num_experts_per_token", "moe_top_k", "moe_k", "moe_topk", "top_k_experts"}
_SHARED_EXPERT_KEYS = {"n_shared_experts", "num_shared_experts", "moe_num_shared_experts"}
_RANK_KEYS = {"kv_lora_rank", "q_lora_rank", "o_lora_rank", "laurel_rank", "time_step_rank", "mamba_dt_rank",
              "hidden_size_per_layer_input", "ple_embed_dim", "gated_norm_rank", "loop_gate_rank", "hc_lowrank"}
_STATE_KEYS = {"state_size", "ssm_state_size", "mamba_d_state"}
_MAMBA_HEAD_DIM_KEYS = {"mamba_d_head", "mamba_head_dim", "mamba_headdim"}
_MAMBA_HEAD_KEYS = {"mamba_n_heads", "mamba_num_heads", "n_mamba_heads"}
_VOCAB_KEYS = {"vocab_size"}


def _layer_count(d: dict) -> tuple[str | None, int | None]:
    for key in _LAYER_KEYS:
        if isinstance(d.get(key), int) and not isinstance(d.get(key), bool) and d[key] > 0:
            return key, d[key]
    return None, None


def _is_index_list(key: str, v: Any, n: int) -> bool:
    """A list of layer indices (moe_layers, full_attn_idxs, global_attn_indexes...): increasing ints below n."""
    return (isinstance(v, list) and 0 < len(v) <= n and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            and all(0 <= x < n for x in v) and all(a < b for a, b in zip(v, v[1:]))
            and ("layer" in key or "idx" in key or "index" in key or "ids" in key))


def _is_per_layer(v: Any, n: int, key: str = "") -> bool:
    """A list with one entry per layer (layer_types, mlp_layer_types, intermediate_size per layer...)."""
    return isinstance(v, list) and len(v) == n and n > 1 and not _is_index_list(key, v, n)


def _per_layer_config(d: dict) -> dict[int, dict]:
    """The heterogeneous per-layer overrides (``per_layer_config``), keyed by int layer index."""
    plc = d.get("per_layer_config")
    return {int(k): v for k, v in plc.items()} if isinstance(plc, dict) else {}


# Counts of layers at the start (first_k_dense_replace: the first k layers are dense) or at the end
# (num_kv_shared_layers: the last k layers reuse earlier layers' KV) of the stack.
_HEAD_COUNT_KEYS = {"first_k_dense_replace", "num_dense_layers"}
_TAIL_COUNT_KEYS = {"num_kv_shared_layers"}


def _keep_layers(d: dict, n: int) -> list[int]:
    """Indices of the layers to keep: the first layer of each distinct kind, where a layer's kind is its value in
    every per-layer list, its membership in every list of layer indices, its per_layer_config entry and whether it
    falls in a head/tail count; at least LAYERS layers."""
    per_layer = [k for k, v in d.items() if _is_per_layer(v, n, k)]
    index_lists = [k for k, v in d.items() if _is_index_list(k, v, n)]
    plc = _per_layer_config(d)
    heads = [d[k] for k in _HEAD_COUNT_KEYS if isinstance(d.get(k), int)]
    tails = [d[k] for k in _TAIL_COUNT_KEYS if isinstance(d.get(k), int)]
    seen, keep = set(), []
    for i in range(n):
        kind = (tuple(repr(d[k][i]) for k in per_layer) + tuple(i in d[k] for k in index_lists)
                + (repr(plc.get(i)),) + tuple(i < h for h in heads) + tuple(i >= n - t for t in tails))
        if kind not in seen:
            seen.add(kind)
            keep.append(i)
    for i in range(n):
        if len(keep) >= LAYERS:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


def _kv_heads(old_kv: int | None, old_heads: int | None) -> int:
    """KV heads keep the attention kind: multi-head stays multi-head, multi-query stays one head, else grouped."""
    if old_kv is None:
        return KV_HEADS
    if old_heads is not None and old_kv == old_heads:
        return HEADS
    return 1 if old_kv == 1 else KV_HEADS


_MIRROR_WORDS = ("dim", "size", "hidden", "channel")
# Sizes that only need a ceiling: (keys, the tiny value); linear_num_key_heads: a gated delta net's key heads
_CAPS = ((_POSITION_KEYS, POSITIONS), (_EXPERT_KEYS, EXPERTS), (_TOPK_KEYS, EXPERTS_PER_TOKEN),
         (_SHARED_EXPERT_KEYS, 1), (_RANK_KEYS, HEAD_DIM), (_STATE_KEYS, STATE), (_MAMBA_HEAD_DIM_KEYS, HEAD_DIM),
         ({"linear_num_key_heads"}, KV_HEADS))


def _small(k: str, v: Any, scope: dict, old_heads: int | None, ids: dict[int, int], vocab: int,
           hiddens: set[int]) -> Any:
    """The small value of one scalar config entry ``k`` (``v`` when no rule applies). ``scope`` is the whole
    config dict it comes from (with its parent's entries for a per-layer override dict), ``ids`` maps the special
    token ids already moved into the small vocabulary, ``hiddens`` holds every hidden size of the config tree."""
    if v is None:
        if k == "head_dim" and old_heads is not None:
            return HEAD_DIM  # some defaults leave it unset though the model reads it
        if k in _KV_KEYS and old_heads is not None:
            return KV_HEADS  # likewise
        if k in _TOPK_KEYS and any(isinstance(scope.get(e), int) for e in _EXPERT_KEYS):
            return EXPERTS_PER_TOKEN  # likewise (an MoE config without a top-k)
        return v
    if isinstance(v, float):
        if ("dropout" in k or "pdrop" in k or "layerdrop" in k) and v > 0:
            return 0.0
        return v
    if not isinstance(v, int) or isinstance(v, bool):
        return v
    if k.endswith("_per_layer"):  # a per-layer list of a known size (num_attention_heads_per_layer...)
        k = k[: -len("_per_layer")]
    if (k.endswith("token_id") or k.endswith("token_index")) and v >= vocab:
        return ids.setdefault(v, vocab - 1 - len(ids))
    if k in _HIDDEN_KEYS:
        return min(v, HIDDEN)
    if k == "attention_hidden_size" and isinstance(scope.get("hidden_size"), int):
        return max(1, v * HIDDEN // scope["hidden_size"])  # a multiple of hidden_size (zamba: 2x, rwkv: 1x)
    if k in _FFN_KEYS:
        return min(v, FFN)
    if k in _MOE_FFN_KEYS:
        return min(v, MOE_FFN)
    if k == "num_heads" and "expand" in scope and "head_dim" in scope:
        return max(1, int(scope["expand"] * HIDDEN) // HEAD_DIM)  # Mamba-2: num_heads * head_dim = expand * hidden
    if k in _HEAD_KEYS:
        return min(v, HEADS)
    if k in _KV_KEYS:
        return _kv_heads(v, old_heads)
    if k == "head_dim" and v == scope.get("qk_rope_head_dim"):
        return HEAD_DIM // 2  # MLA: head_dim names the rotary part
    if k in ("head_dim", "swa_head_dim") and isinstance(scope.get("qk_nope_head_dim"), int) and isinstance(
            scope.get("qk_rope_head_dim"), int) and v == scope["qk_nope_head_dim"] + scope["qk_rope_head_dim"]:
        return HEAD_DIM + HEAD_DIM // 2  # MLA: head_dim = qk_nope_head_dim + qk_rope_head_dim
    if k == "qk_head_dim":
        return min(v, HEAD_DIM + HEAD_DIM // 2)  # MLA: qk_nope_head_dim + qk_rope_head_dim
    if k in _HEAD_DIM_KEYS:
        return min(v, HEAD_DIM)
    if k in ("qk_rope_head_dim", "rotary_dim"):
        return min(v, HEAD_DIM // 2)
    cap = next((c for keys, c in _CAPS if k in keys), None)
    if cap is not None:
        return min(v, cap)
    if k == "linear_num_value_heads":  # value heads, a multiple of the key heads
        ratio = max(1, v // scope["linear_num_key_heads"]) if scope.get("linear_num_key_heads") else 1
        return min(v, KV_HEADS * ratio)
    if k == "mamba_d_ssm":  # falcon_h1's explicit d_inner = mamba heads x mamba head dim
        expand = scope.get("mamba_expand", 2)
        return max(1, int(expand * HIDDEN) // HEAD_DIM) * min(scope.get("mamba_d_head") or HEAD_DIM, HEAD_DIM)
    if k in _MAMBA_HEAD_KEYS and any(h in scope for h in _MAMBA_HEAD_DIM_KEYS):
        expand = scope.get("mamba_expand", scope.get("expand", 2))
        return max(1, int(expand * HIDDEN) // HEAD_DIM)  # Mamba-2: heads * head_dim = expand * hidden
    if k in _VOCAB_KEYS or ("vocab" in k and "offset" not in k and "divisible" not in k):
        return min(v, VOCAB)  # also unpadded_vocab_size, vocab_size_per_layer_input, hash/n-gram vocabularies
    if k in ("n_group", "num_expert_group"):
        return min(v, 2)  # 2 groups of 2 experts
    if k in ("n_groups", "mamba_n_groups", "mamba_ngroups"):
        return min(v, 2)  # Mamba-2 B/C groups (they divide the heads)
    if k == "topk_group":
        return 1
    if v in hiddens and v > HIDDEN and any(w in k for w in _MIRROR_WORDS):
        return HIDDEN  # a size that mirrors some (sub-)config's hidden size (adapter_in_dim, adapter_out_dim...)
    return v


def _hidden_sizes(d: dict) -> set[int]:
    """Every hidden size in a config dict and its sub-configs."""
    out = set()
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _hidden_sizes(v)
        elif k in _HIDDEN_KEYS and isinstance(v, int) and not isinstance(v, bool):
            out.add(v)
    return out


def _shrink(d: dict, sub_keys: set[str], ids: dict[int, int], hiddens: set[int], parent: dict | None = None) -> dict:
    """The overrides for one config dict (a sub-config's dict comes back whole, with its own overrides merged;
    ``parent`` is the config a per-layer override dict belongs to)."""
    out: dict[str, Any] = {}
    layer_key, n = _layer_count(d) if parent is None else (None, None)
    keep = _keep_layers(d, n) if n else None
    scope = {**(parent or {}), **d}
    old_heads = next((scope[k] for k in _MAIN_HEAD_KEYS if isinstance(scope.get(k), int)), None)
    vocab = min(d["vocab_size"], VOCAB) if isinstance(d.get("vocab_size"), int) else VOCAB
    for k, v in d.items():
        if k in sub_keys and isinstance(v, dict):
            new = {**v, **_shrink(v, _sub_keys_of(v), ids, hiddens)}
        elif k == "per_layer_config" and isinstance(v, dict):
            new = {keep.index(i) if keep else i: {**o, **_shrink(o, set(), ids, hiddens, parent=d)}
                   for i, o in _per_layer_config(d).items() if not keep or i in keep}
        elif keep is not None and (k in _LAYER_KEYS or k in _OTHER_LAYER_KEYS) and isinstance(v, int):
            new = len(keep) if k == layer_key else min(v, LAYERS)
        elif keep is not None and k in _HEAD_COUNT_KEYS and isinstance(v, int):
            new = sum(i < v for i in keep)
        elif keep is not None and k in _TAIL_COUNT_KEYS and isinstance(v, int):
            new = sum(i >= n - v for i in keep)
        elif keep is not None and _is_per_layer(v, n, k):
            new = [_small(k, v[i], scope, old_heads, ids, vocab, hiddens) for i in keep]
        elif keep is not None and _is_index_list(k, v, n):
            new = [keep.index(i) for i in v if i in keep]
        elif isinstance(v, list) and k.endswith("token_id") and all(isinstance(x, int) for x in v):
            new = [_small(k, x, scope, old_heads, ids, vocab, hiddens) for x in v]
        else:
            new = _small(k, v, scope, old_heads, ids, vocab, hiddens)
        if new is not v and new != v:
            out[k] = new
    return out


def _sub_keys_of(d: dict) -> set[str]:
    """Keys of a config dict that hold a nested config (a dict with a model_type)."""
    return {k for k, v in d.items() if isinstance(v, dict) and "model_type" in v}


def _merge(out: dict, d: dict, overrides: dict, sub_keys: set[str]) -> dict:
    """Apply ``overrides`` to ``out``: a dict for a sub-config key is merged into that sub-config's (shrunk) dict."""
    for k, v in overrides.items():
        if isinstance(v, dict) and k in sub_keys and isinstance(out.get(k, d.get(k)), dict):
            out[k] = {**out.get(k, d.get(k)), **v}
        else:
            out[k] = v
    return out


def default_config(model_type: str):
    """The family's default config, with its DEFAULT_FIXES (before any shrinking)."""
    return AutoConfig.for_model(model_type, **copy.deepcopy(DEFAULT_FIXES.get(model_type, {})))


def tiny_overrides(model_type: str) -> dict[str, Any]:
    """The generic shrinker's overrides for ``model_type`` (read off its default config with DEFAULT_FIXES, which
    they include), plus its FAMILY_OVERRIDES entry."""
    cfg = default_config(model_type)
    d = cfg.to_dict()
    sub_keys = set(getattr(cfg, "sub_configs", {}) or {}) | _sub_keys_of(d)
    out = _merge({}, d, copy.deepcopy(DEFAULT_FIXES.get(model_type, {})), sub_keys)
    out.update(_shrink(d, sub_keys, {}, _hidden_sizes(d)))
    if "use_cache" in d:
        out["use_cache"] = False  # training passes only; some hybrid caches need more than a tiny config gives
    return _merge(out, d, copy.deepcopy(FAMILY_OVERRIDES.get(model_type, {})), sub_keys)


def tiny_config(model_type: str):
    """The family's tiny config: ``AutoConfig.for_model(model_type, **tiny_overrides(model_type))``."""
    return AutoConfig.for_model(model_type, **tiny_overrides(model_type))


def model_class(model_type: str) -> type:
    """The causal-LM class the auto mapping names for the family."""
    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def build_tiny(model_type: str) -> torch.nn.Module:
    """The family's causal-LM class, tiny, in float32, seeded (torch.manual_seed(0))."""
    return instantiate(model_type, tiny_config(model_type))


def instantiate(model_type: str, config) -> torch.nn.Module:
    """The family's causal-LM class built from ``config`` (seeded with torch.manual_seed(0)), in float32."""
    cls = model_class(model_type)
    # As AutoModelForCausalLM.from_config, the class gets the sub-config of its own config class when the family's
    # config is composite (text_config, or musicgen's decoder).
    wanted = getattr(cls, "config_class", None)
    if wanted is not None and not isinstance(config, wanted):
        subs = [getattr(config, k, None) for k in (getattr(config, "sub_configs", {}) or {})]
        config = next((c for c in subs if isinstance(c, wanted)), config)
    torch.manual_seed(0)
    return cls._from_config(config).float()


def _special_ids(config) -> set[int]:
    """Every *token_id / *token_index value in the config tree."""
    ids: set[int] = set()

    def walk(d: dict):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            elif ("token_id" in str(k) or "token_index" in str(k)) and not isinstance(v, bool):
                for x in v if isinstance(v, list) else [v]:
                    if isinstance(x, int):
                        ids.add(x)

    walk(config.to_dict())
    return ids


def _vocab(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None) or getattr(config, "vocab_size", VOCAB)


def _random_ids(model: torch.nn.Module, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Token ids of ``shape`` that avoid the family's special token ids (image/audio placeholders, pad...)."""
    config = model.config
    special = _special_ids(config)
    allowed = torch.tensor([i for i in range(_vocab(config)) if i not in special])
    g = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), shape, generator=g)]


def tiny_batch(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids of shape (BATCH, SEQ) avoiding the family's special token ids, labels equal to them, and any other
    input the family needs (see _BATCH_EXTRAS)."""
    input_ids = _random_ids(model, (BATCH, SEQ), seed)
    batch = {"input_ids": input_ids, "labels": input_ids.clone()}
    extra = _BATCH_EXTRAS.get(type(model).__name__)
    if extra is not None:
        batch = extra(model, batch)
    return batch


def _git_batch(model, batch):
    # GIT's loss drops the logits of the image tokens, so the forward needs an image.
    vision = model.config.vision_config
    g = torch.Generator().manual_seed(1)
    batch["pixel_values"] = torch.randn(BATCH, vision.num_channels, vision.image_size, vision.image_size, generator=g)
    return batch


def _xmod_batch(model, batch):
    batch["lang_ids"] = torch.zeros(BATCH, dtype=torch.long)  # X-MOD routes through a per-language adapter
    return batch


def _big_bird_batch(model, batch):
    # 16 tokens: block-sparse attention needs seq_len > (5 + 2 * num_random_blocks) * block_size (see overrides).
    ids = torch.cat([batch["input_ids"], batch["input_ids"]], dim=1)
    return {"input_ids": ids, "labels": ids.clone()}


def _musicgen_batch(model, batch):
    # The decoder reads (batch * num_codebooks, seq) codes; its labels are (batch, seq, num_codebooks).
    k = model.config.num_codebooks
    codes = _random_ids(model, (BATCH, k, SEQ), seed=2)
    return {"input_ids": codes.reshape(BATCH * k, SEQ), "labels": codes.transpose(1, 2).contiguous()}


# Keyed by model class name (a composite family's class holds only its sub-config, whose model_type differs).
_BATCH_EXTRAS: dict[str, Any] = {
    "BigBirdForCausalLM": _big_bird_batch,
    "GitForCausalLM": _git_batch,
    "MusicgenForCausalLM": _musicgen_batch,
    "MusicgenMelodyForCausalLM": _musicgen_batch,
    "XmodForCausalLM": _xmod_batch,
}
