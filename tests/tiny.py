"""Tiny models built from configs and generated token data, shared by the Trainer tests."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import (AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, TrainingArguments)

VOCAB, SEQ = 48, 24


def tiny_model(family: str = "gpt2", seed: int = 0) -> torch.nn.Module:
    """A 2-layer, 32-wide causal LM without dropout (so runs are deterministic)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
        model = GPT2LMHeadModel(cfg)
        # GPT-2 leaves loss_type unset, and the Trainer then counts one loss item too many per sequence in its
        # num_items_in_batch (fused mode's loss scale, as for any optimizer); naming the loss it computes anyway
        # makes fused and per-sub-batch runs average the same items.
        model.loss_type = "ForCausalLM"
        return model
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2))
    if family == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**common, num_key_value_heads=2, num_local_experts=8,
                                                num_experts_per_tok=1, output_router_logits=True,
                                                router_aux_loss_coef=0.02))
    if family == "qwen2_moe":
        return Qwen2MoeForCausalLM(Qwen2MoeConfig(**common, num_key_value_heads=2, num_experts=8, num_experts_per_tok=1,
                                                  moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                                  output_router_logits=True, router_aux_loss_coef=0.02))
    if family == "gpt_oss":  # experts stored (E, in, out), gate_up_proj interleaved by column, 2-D expert biases
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(
            "gpt_oss", **common, num_key_value_heads=2, head_dim=8, num_local_experts=8, num_experts_per_tok=1,
            layer_types=["sliding_attention", "full_attention"], sliding_window=8, output_router_logits=True,
            router_aux_loss_coef=0.02))
    raise ValueError(family)


def chain_dataset(n: int = 256, seed: int = 0, pad_to_random_length: bool = False, successor_seed: int = 1234) -> Dataset:
    """Sequences following a fixed random successor table (with 10% noise): easy to learn, so loss falls.

    With ``pad_to_random_length`` each row keeps a random prefix and pads the rest (labels -100), so
    sub-batches hold unequal numbers of loss items."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randperm(VOCAB - 1, generator=torch.Generator().manual_seed(successor_seed)) + 1
    rows = []
    for _ in range(n):
        x = [int(torch.randint(1, VOCAB, (1,), generator=g))]
        for _ in range(SEQ - 1):
            noisy = float(torch.rand(1, generator=g)) < 0.1
            x.append(int(torch.randint(1, VOCAB, (1,), generator=g)) if noisy else int(succ[x[-1] - 1]))
        mask = [1] * SEQ
        if pad_to_random_length:
            keep = int(torch.randint(4, SEQ + 1, (1,), generator=g))
            x = x[:keep] + [0] * (SEQ - keep)
            mask = [1] * keep + [0] * (SEQ - keep)
        labels = [t if m else -100 for t, m in zip(x, mask)]
        rows.append({"input_ids": x, "attention_mask": mask, "labels": labels})
    return Dataset.from_list(rows)


def tiny_args(out, args_cls: type = TrainingArguments, **overrides) -> TrainingArguments:
    """Deterministic CPU arguments of the tiny runs; ``args_cls`` e.g. TRL's SFTConfig."""
    base = dict(output_dir=str(out), use_cpu=True, report_to=[], max_steps=30, per_device_train_batch_size=4,
                gradient_accumulation_steps=1, learning_rate=0.3, lr_scheduler_type="constant", logging_steps=1,
                save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0, max_grad_norm=1.0)
    base.update(overrides)
    return args_cls(**base)


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def assert_loss_falls(trainer, min_steps: int = 30, ratio: float = 0.85) -> None:
    ls = losses(trainer)
    assert trainer.state.global_step >= min_steps
    first, last = sum(ls[:3]) / 3, sum(ls[-3:]) / 3
    assert last < ratio * first, f"loss did not fall: first {first:.3f}, last {last:.3f}"


def max_rel_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p.detach() - q.detach()).abs().max() / q.detach().abs().max().clamp_min(1e-12))
               for p, q in zip(a.parameters(), b.parameters()))
