"""BADM with PEFT LoRA adapters and TRL's SFTTrainer (via optimizers= and via the mixin)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from hf_badm import BADMConfig, BADMTrainer, BADMTrainerMixin, create_badm_optimizer
from hf_badm.data import build_tokenizer, instruction_dataset
from tiny import assert_loss_falls, chain_dataset, tiny_args, tiny_model

trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def pretrained_base(tmp_path_factory):
    """LoRA adapts a pre-trained model: pre-train the tiny base briefly (full BADM) and save it."""
    out = tmp_path_factory.mktemp("base")
    trainer = BADMTrainer(model=tiny_model("llama"), args=tiny_args(out / "run", max_steps=20),
                          train_dataset=chain_dataset(seed=1), badm_config=BADMConfig(rho=5.0))
    trainer.train()
    trainer.model.save_pretrained(out / "model")
    return out / "model"


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_lora_trains_only_adapters_and_reloads_identically(tmp_path, pretrained_base, mode):
    base = LlamaForCausalLM.from_pretrained(pretrained_base)
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                            task_type="CAUSAL_LM"))
    held_out = chain_dataset(n=64, seed=7)
    trainer = BADMTrainer(model=model, args=tiny_args(tmp_path / "run", per_device_eval_batch_size=16),
                          train_dataset=chain_dataset(), eval_dataset=held_out,
                          badm_config=BADMConfig(mode=mode, sigma=1.0, rho=1.5))
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    # a tiny base adapts slowly through rank-8 adapters: AdamW (lr 1e-2) gains 2.6% here, BADM about 2%
    assert trainer.state.global_step == 30 and after < 0.99 * before, (before, after)

    in_optimizer = {id(p) for g in trainer.badm_optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for n, p in model.named_parameters() if p.requires_grad}
    assert in_optimizer == trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    for n, p in model.get_base_model().named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen[n.replace(".base_layer", "")]), n

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(pretrained_base), tmp_path / "adapter")
    x = torch.randint(1, 40, (2, 12))
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, reloaded(input_ids=x).logits)


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_full_fine_tuning_of_a_saved_model(tmp_path, pretrained_base, mode):
    """from_pretrained, then every weight trains on new data (another successor table)."""
    model = LlamaForCausalLM.from_pretrained(pretrained_base)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = BADMTrainer(model=model, args=tiny_args(tmp_path, gradient_accumulation_steps=2),
                          train_dataset=chain_dataset(seed=5, successor_seed=99), badm_config=BADMConfig(mode=mode))
    trainer.train()
    assert_loss_falls(trainer)
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters())


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory):
    tokenizer = build_tokenizer(vocab_size=400)
    data = instruction_dataset(num_train=256, num_eval=16, seed=0, tasks=("copy", "add"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer, data, config


def sft_args(out, **kw):
    from trl import SFTConfig

    base = dict(output_dir=str(out), use_cpu=True, report_to=[], max_steps=30, per_device_train_batch_size=8,
                learning_rate=0.3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", disable_tqdm=True,
                seed=0, max_length=64, max_grad_norm=1.0, dataloader_num_workers=0)
    base.update(kw)
    return SFTConfig(**base)


def test_sft_trainer_with_optimizers_argument(tmp_path, sft_setup):
    from trl import SFTTrainer

    tokenizer, data, config = sft_setup
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    args = sft_args(tmp_path)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data["train"], processing_class=tokenizer,
                         optimizers=create_badm_optimizer(model, args, sigma=3.0, rho=4.5))
    trainer.train()
    assert_loss_falls(trainer)


class BADMSFTTrainer(BADMTrainerMixin, trl.SFTTrainer):
    """TRL's SFTTrainer with BADM: the mixin goes first."""


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_sft_trainer_through_the_mixin(tmp_path, sft_setup, mode):
    tokenizer, data, config = sft_setup
    torch.manual_seed(0)
    trainer = BADMSFTTrainer(model=LlamaForCausalLM(config), args=sft_args(tmp_path, gradient_accumulation_steps=2),
                             train_dataset=data["train"], processing_class=tokenizer,
                             badm_config=BADMConfig(mode=mode, sigma=3.0, sub_batches_per_micro_batch=2))
    trainer.train()
    assert_loss_falls(trainer)
    logged = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert logged["badm_sub_batches"] == (4 if mode == "per_sub_batch" else 1)


def test_exact_match_decoding_of_a_moe_model_with_router_logits(sft_setup):
    from transformers import MixtralConfig, MixtralForCausalLM

    from hf_badm.data import generate_completions

    tokenizer, data, config = sft_setup
    torch.manual_seed(0)
    moe = MixtralForCausalLM(MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                           num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    prompts = [row["prompt"] for row in data["test"].select(range(4))]
    out = generate_completions(moe, tokenizer, prompts, max_new_tokens=6)
    assert len(out) == 4 and moe.config.output_router_logits


def test_trl_training_step_and_its_offload_context_run_once_per_sub_batch(tmp_path, sft_setup):
    """SFTTrainer.training_step enters its activation-offloading context (offloading itself needs an accelerator, so
    the context here is a counting one); per-sub-batch runs that step, and so enters the context, per sub-batch."""
    tokenizer, data, config = sft_setup
    torch.manual_seed(0)
    trainer = BADMSFTTrainer(model=LlamaForCausalLM(config), args=sft_args(tmp_path, max_steps=3, gradient_accumulation_steps=2),
                             train_dataset=data["train"], processing_class=tokenizer,
                             badm_config=BADMConfig(mode="per_sub_batch", sigma=3.0, sub_batches_per_micro_batch=2))
    entered = []

    class Counted:  # entered as TRL enters its offloading context: once per training_step call
        def __enter__(self):
            entered.append(trainer.state.global_step)

        def __exit__(self, *exc):
            return False

    trainer.maybe_activation_offload_context = Counted()
    trainer.train()
    assert entered == [0] * 4 + [1] * 4 + [2] * 4  # steps x (2 micro-batches x 2 sub-batches)
    assert trainer.badm_optimizer.sub_batches_last_step == 4

