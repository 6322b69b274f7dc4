"""BADM inside transformers.Trainer: factory, BADMTrainer, per-sub-batch = fused, items weights = literal,
resume, MoE, bf16, misconfiguration. Tiny models from configs, generated data, real Trainer runs."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import transformers
from transformers import Trainer

from hf_badm import BADM, BADMConfig, BADMMetricsCallback, BADMTrainer, BADMTrainerMixin, create_badm_optimizer
from hf_badm.factory import badm_optimizer_cls_and_kwargs, decay_parameter_names
from hf_badm.optim.local_solve import LOCAL_SOLVES
from hf_badm.trainer import count_loss_items
from reference import LiteralBADM
from tiny import assert_loss_falls, chain_dataset, max_rel_diff, tiny_args, tiny_model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_create_badm_optimizer_in_a_plain_trainer_pretrains_from_config(tmp_path, family):
    model = tiny_model(family)
    args = tiny_args(tmp_path, lr_scheduler_type="linear", warmup_steps=3, weight_decay=0.01)
    optimizer, scheduler = create_badm_optimizer(model, args, sigma=3.0, rho=4.5)
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("bias" not in names[id(p)] and "norm" not in names[id(p)] for p in decay["params"])
    assert any("bias" in names[id(p)] or "ln" in names[id(p)] or "norm" in names[id(p)] for p in no_decay["params"])
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    trainer = Trainer(model=model, args=args, train_dataset=chain_dataset(), optimizers=(optimizer, scheduler))
    trainer.train()
    assert_loss_falls(trainer)


def test_schedule_factor_scales_both_penalties(tmp_path):
    """sigma_t = sigma/f_t, rho_t = rho/f_t: the logged step size 1/sigma_t follows the schedule, beta stays."""
    model = tiny_model()
    args = tiny_args(tmp_path, lr_scheduler_type="linear", warmup_steps=0, max_steps=10)
    optimizer, scheduler = create_badm_optimizer(model, args, sigma=2.0, rho=5.0)
    for t in range(5):
        f = 1 - t / 10
        m = optimizer.metrics()
        assert m["badm_step_size"] == pytest.approx(f / 2.0) and m["badm_beta"] == pytest.approx(5.0 / 7.0)
        scheduler.step()


@pytest.mark.parametrize("route", ["optimizers", "badm_trainer"])
def test_badm_metrics_are_logged_for_the_step_of_the_logged_learning_rate(tmp_path, route):
    """Cosine with warm-up: every logged badm_step_size equals that log's learning_rate (the same step), finite from
    the zero-factor first warm-up step to the end of the decay; the optimizers= route logs them via the callback."""
    model = tiny_model()
    args = tiny_args(tmp_path, lr_scheduler_type="cosine", warmup_steps=2, max_steps=8)
    if route == "optimizers":
        trainer = Trainer(model=model, args=args, train_dataset=chain_dataset(), callbacks=[BADMMetricsCallback()],
                          optimizers=create_badm_optimizer(model, args))
    else:
        trainer = BADMTrainer(model=model, args=args, train_dataset=chain_dataset())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 8 and logs[0]["learning_rate"] == 0.0 and logs[-1]["learning_rate"] > 0
    for h in logs:
        assert h["badm_step_size"] == pytest.approx(h["learning_rate"], rel=1e-12, abs=1e-15)
        assert all(math.isfinite(v) for k, v in h.items() if k.startswith("badm_"))


@pytest.mark.parametrize("family", ["gpt2", "llama", "mixtral"])
def test_decay_rule_is_the_trainers(tmp_path, family):
    """create_badm_optimizer decays exactly the tensors a Trainer decays (biases and norm weights excluded)."""
    model = tiny_model(family)
    trainer = Trainer(model=model, args=tiny_args(tmp_path))
    assert decay_parameter_names(model) == trainer.get_decay_parameter_names(model)
    assert any("norm" in n or "ln" in n for n, _ in model.named_parameters() if n not in decay_parameter_names(model))


def test_learning_rate_maps_to_sigma_and_adamw_scale_warns(tmp_path):
    model = tiny_model()
    opt, _ = create_badm_optimizer(model, tiny_args(tmp_path, learning_rate=0.25))
    assert opt.param_groups[0]["sigma"] == pytest.approx(4.0)
    assert opt.param_groups[0]["rho"] == pytest.approx(4.0 * LOCAL_SOLVES["none"].rho_over_sigma)
    with pytest.warns(UserWarning, match="AdamW learning rate"):
        create_badm_optimizer(model, tiny_args(tmp_path, learning_rate=5e-5))
    with pytest.warns(UserWarning, match="AdamW-scale steps"):
        create_badm_optimizer(model, tiny_args(tmp_path, learning_rate=1.0), preconditioner="normalized")


@pytest.mark.parametrize("preconditioner, ratio", [("none", 9.0), ("normalized", 9.0), ("newton_schulz", 1.0),
                                                   ("second_moment", 6000.0)])
def test_default_rho_per_preconditioner(preconditioner, ratio):
    """The measured default rho/sigma of each local solve, in BADM itself and through BADMConfig."""
    assert BADM(tiny_model().parameters(), lr=0.01, preconditioner=preconditioner).defaults["rho"] == pytest.approx(100 * ratio)
    config = BADMConfig(preconditioner=preconditioner)
    assert BADM(tiny_model().parameters(), **config.optimizer_kwargs(0.01)).defaults["rho"] == pytest.approx(100 * ratio)


def test_optimizer_cls_and_kwargs_path(tmp_path):
    cls, kwargs = badm_optimizer_cls_and_kwargs(tiny_args(tmp_path), sigma=3.0, rho=4.5)
    trainer = Trainer(model=tiny_model(), args=tiny_args(tmp_path), train_dataset=chain_dataset(),
                      optimizer_cls_and_kwargs=(cls, kwargs))
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, BADM)
    assert_loss_falls(trainer)


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_badm_trainer_trains_and_logs_badm_metrics(tmp_path, mode):
    trainer = BADMTrainer(model=tiny_model("llama"), args=tiny_args(tmp_path, gradient_accumulation_steps=2),
                          train_dataset=chain_dataset(), badm_config=BADMConfig(mode=mode))
    trainer.train()
    assert_loss_falls(trainer)
    logged = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert logged["badm_step_size"] == pytest.approx(0.3)
    assert logged["badm_sub_batches"] == 2 if mode == "per_sub_batch" else 1
    assert logged["badm_dual_norm"] > 0 and logged["badm_skipped_steps"] == 0 and logged["grad_norm"] > 0


@pytest.mark.parametrize("k", [1, 2])
def test_per_sub_batch_equals_fused_with_equal_sub_batches(tmp_path, k):
    common = dict(gradient_accumulation_steps=4, max_steps=20, max_grad_norm=0.0, weight_decay=0.01)
    runs = {}
    for mode in ("fused", "per_sub_batch"):  # float64, so that 20 steps compare the algorithms, not rounding
        trainer = BADMTrainer(model=tiny_model("gpt2").double(), args=tiny_args(tmp_path / mode, **common),
                              train_dataset=chain_dataset(),
                              badm_config=BADMConfig(mode=mode, sub_batches_per_micro_batch=k if mode != "fused" else 1))
        trainer.train()
        runs[mode] = trainer
    assert runs["per_sub_batch"].badm_optimizer.sub_batches_last_step == 4 * k
    assert max_rel_diff(runs["per_sub_batch"].model, runs["fused"].model) <= 1e-5


class RecordingTrainer(BADMTrainer):
    """Keeps every micro-batch it trains on, to replay them through the literal algorithm."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def test_items_weighted_per_sub_batch_equals_literal_algorithm(tmp_path):
    ga, k, steps, sigma, rho = 2, 2, 6, 3.0, 4.5
    model = tiny_model("gpt2")
    start = [p.detach().clone() for p in model.parameters()]
    trainer = RecordingTrainer(model=model, args=tiny_args(tmp_path, gradient_accumulation_steps=ga, max_steps=steps,
                                                           max_grad_norm=0.0),
                               train_dataset=chain_dataset(pad_to_random_length=True),
                               badm_config=BADMConfig(mode="per_sub_batch", sub_batches_per_micro_batch=k,
                                                      sigma=sigma, rho=rho, sub_batch_weights="items"))
    trainer.seen = []
    trainer.train()

    replay = tiny_model("gpt2")
    names = [n for n, _ in replay.named_parameters()]
    ref = LiteralBADM(start, sigma, rho)
    weights_seen = set()
    for step in range(steps):
        grads, weights = [], []
        for micro in trainer.seen[step * ga:(step + 1) * ga]:
            for sub in ({name: v.tensor_split(k)[i] for name, v in micro.items()} for i in range(k)):
                params = [w.clone().requires_grad_() for w in ref.w]
                loss = torch.func.functional_call(replay, dict(zip(names, params)), args=(), kwargs=sub).loss
                grads.append(list(torch.autograd.grad(loss, params)))
                weights.append(float(count_loss_items(sub, shifts_labels=True)))
        weights_seen.add(tuple(weights))
        ref.step(grads, weights)
    assert len(weights_seen) > 1 and any(len(set(w)) > 1 for w in weights_seen)  # really unequal, changing
    rel = max(float((p.detach() - w).abs().max() / w.abs().max()) for p, w in zip(trainer.model.parameters(), ref.w))
    assert rel <= 1e-5


def checkpoint_run(out: Path, mode: str, resume: str | None = None) -> torch.nn.Module:
    args = tiny_args(out, max_steps=10, save_strategy="steps", save_steps=5, gradient_accumulation_steps=2,
                     lr_scheduler_type="cosine", warmup_steps=2)
    trainer = BADMTrainer(model=tiny_model("llama"), args=args, train_dataset=chain_dataset(),
                          badm_config=BADMConfig(mode=mode))
    trainer.train(resume_from_checkpoint=resume)
    return trainer.model


@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_resume_from_checkpoint_is_bitwise_identical(tmp_path, mode):
    full = checkpoint_run(tmp_path / "full", mode)
    ckpt = tmp_path / "full" / "checkpoint-5"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert state["badm"]["mode"] == mode and state["state"]
    resumed = checkpoint_run(tmp_path / "resumed", mode, resume=str(ckpt))
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("mode", ["fused", "per_sub_batch"])
def test_moe_with_router_logits_and_idle_experts(tmp_path, family, mode):
    model = tiny_model(family)
    idle = []  # (step, parameter name) of expert weights that got no gradient in a step
    expert_params = [(n, p) for n, p in model.named_parameters() if "experts" in n]

    trainer = BADMTrainer(model=model, args=tiny_args(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=1),
                          train_dataset=chain_dataset(), badm_config=BADMConfig(mode=mode))
    if mode == "fused":
        trainer.add_callback(_IdleExpertProbe(expert_params, idle))
    trainer.train()
    assert_loss_falls(trainer)
    batch = {k: torch.tensor(v[:2]) for k, v in chain_dataset()[:2].items()}
    with torch.no_grad():
        out = model(**batch)  # the router's auxiliary loss is part of the trained loss
    assert out.aux_loss is not None and out.aux_loss > 0
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    assert float(out.loss) == pytest.approx(float(lm + model.config.router_aux_loss_coef * out.aux_loss), rel=1e-5)
    if mode == "fused":
        assert idle, "expected some expert to receive no tokens in some step"
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _IdleExpertProbe:
    """Records expert parameters whose gradient is None (no tokens routed) right before a step."""

    def __init__(self, params, record):
        self.params, self.record = params, record

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for n, p in self.params:
            if p.grad is None:
                self.record.append((n, "all"))
            elif p.dim() == 3:  # experts fused into one [num_experts, ...] tensor
                self.record.extend((n, e) for e in range(p.shape[0]) if not p.grad[e].any())


def test_bf16_autocast_on_cpu_tracks_fp32_training(tmp_path):
    """bf16 autocast (matmuls really run in bf16: checked on an activation) trains per-sub-batch BADM like fp32 does."""
    losses_by_precision, dtypes = {}, []
    for bf16 in (False, True):
        model = tiny_model("llama")
        model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        trainer = BADMTrainer(model=model, args=tiny_args(tmp_path / str(bf16), bf16=bf16), train_dataset=chain_dataset(),
                              badm_config=BADMConfig(mode="per_sub_batch"))
        trainer.train()
        assert_loss_falls(trainer)
        losses_by_precision[bf16] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert torch.bfloat16 in dtypes and torch.float32 in dtypes
    fp32, bf16 = (sum(losses_by_precision[b][-5:]) / 5 for b in (False, True))
    assert abs(bf16 - fp32) <= 0.05 * fp32, (fp32, bf16)


def test_misconfiguration_fails_before_the_first_step(tmp_path):
    with pytest.raises(ValueError, match="sub_batch_weights"):
        BADMConfig(sub_batch_weights="tokens")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma"):
            BADMConfig(sigma=bad)
        with pytest.raises(ValueError, match="rho"):
            BADMConfig(rho=bad)
    with pytest.raises(ValueError, match="sub_batches_per_micro_batch"):
        BADMConfig(sub_batches_per_micro_batch=0)
    frozen = tiny_model()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        BADMTrainer(model=frozen, args=tiny_args(tmp_path), train_dataset=chain_dataset())
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_badm_optimizer(frozen, tiny_args(tmp_path))
    ds = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
          "gradient_accumulation_steps": "auto", "zero_allow_untested_optimizer": True}
    try:
        for overrides, match in ((dict(fp16=True), "fp16"), (dict(deepspeed=ds), "DeepSpeed")):
            with pytest.raises(ValueError, match=match):
                BADMTrainer(model=tiny_model(), args=tiny_args(tmp_path, **overrides), train_dataset=chain_dataset(),
                            badm_config=BADMConfig(mode="per_sub_batch"))
    finally:  # a DeepSpeed TrainingArguments leaves process-wide state behind; later tests must not see it
        from accelerate.state import AcceleratorState
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        unset_hf_deepspeed_config()
        AcceleratorState._reset_state(True)


def test_per_sub_batch_optimizer_in_a_plain_trainer_is_refused(tmp_path):
    """A plain Trainer reduces gradients before the step: per-sub-batch BADM says what to do instead."""
    model = tiny_model()
    args = tiny_args(tmp_path, max_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=chain_dataset(),
                      optimizers=create_badm_optimizer(model, args, mode="per_sub_batch"))
    with pytest.raises(RuntimeError, match="absorb_sub_batch"):
        trainer.train()


class _StepRecorder(Trainer):
    """A trainer with its own training_step (as TRL's SFTTrainer has): records the rows of every call."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.calls.append(inputs["input_ids"].shape[0])
        return super().training_step(model, inputs, num_items_in_batch)


class _BADMStepRecorder(BADMTrainerMixin, _StepRecorder):
    calls: list[int]


def test_per_sub_batch_runs_the_mixed_in_training_step_once_per_sub_batch(tmp_path):
    trainer = _BADMStepRecorder(model=tiny_model(), args=tiny_args(tmp_path, gradient_accumulation_steps=2, max_steps=3),
                                train_dataset=chain_dataset(),
                                badm_config=BADMConfig(mode="per_sub_batch", sub_batches_per_micro_batch=2))
    trainer.calls = []
    trainer.train()
    assert trainer.calls == [2] * (3 * 2 * 2)  # steps x micro-batches x sub-batches, each of 4 / 2 rows


class Doubled(BADMTrainer):
    def compute_loss(self, model, inputs, *args, **kwargs):
        return 2 * super().compute_loss(model, inputs, *args, **kwargs)


class OwnLoss(BADMTrainer):
    """A loss of its own, never calling super().compute_loss (the mixin's is then not on the call path)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        return (out.loss, out) if return_outputs else out.loss


# OwnLoss's loss is the mean loss itself, but its fused run would ignore num_items_in_batch (the Trainer then adds the
# micro-batches' means): its fused reference is the stock BADMTrainer, whose loss is that mean.
@pytest.mark.parametrize("trainer_cls, fused_cls", [(Doubled, Doubled), (OwnLoss, BADMTrainer)])
def test_per_sub_batch_absorbs_the_mean_loss_gradient_whatever_the_step_scales(tmp_path, trainer_cls, fused_cls):
    """What a compute_loss override returns is the loss (here doubled, or its own, not calling super()); the Trainer's
    division by the accumulation steps is not: per-sub-batch still equals fused, and every logged grad_norm is the
    sub-batches'."""
    runs = {}
    for mode, cls in (("fused", fused_cls), ("per_sub_batch", trainer_cls)):
        trainer = cls(model=tiny_model("gpt2").double(),
                          args=tiny_args(tmp_path / mode, gradient_accumulation_steps=4, max_steps=10, max_grad_norm=0.0),
                          train_dataset=chain_dataset(), badm_config=BADMConfig(mode=mode))
        trainer.train()
        runs[mode] = trainer
    assert max_rel_diff(runs["per_sub_batch"].model, runs["fused"].model) <= 1e-5
    norms = [h["grad_norm"] for h in runs["per_sub_batch"].state.log_history if "loss" in h]
    assert len(norms) == 10 and all(n > 0 for n in norms)


@pytest.mark.parametrize("change", ["missing", "other parameters"])
def test_a_changed_private_trainer_hook_fails_at_start_up_naming_the_versions(tmp_path, monkeypatch, change):
    if change == "missing":
        monkeypatch.delattr(Trainer, "_get_num_items_in_batch")
    else:
        monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", lambda self, output_dir, state: None)
    with pytest.raises(RuntimeError) as raised:
        BADMTrainer(model=tiny_model(), args=tiny_args(tmp_path), train_dataset=chain_dataset())
    message = str(raised.value)
    assert "\n" not in message and f"transformers {transformers.__version__}" in message
    assert "supported: transformers>=" in message
    assert ("_get_num_items_in_batch" if change == "missing" else "_save_optimizer_and_scheduler(output_dir, state)") in message


def test_loss_items_mixin_makes_the_trainers_losses_the_models_mean(tmp_path):
    """GPT-2 as it ships (loss_type unset): with the mixin the Trainer's evaluation loss is the model's own mean over
    the tokens it predicts, as BADMTrainer's is; hf-badm gives every comparison optimizer's Trainer the mixin."""
    from hf_badm.app.run import _trainer_class
    from hf_badm.trainer import LossItemsMixin

    model = tiny_model("gpt2")
    model.loss_type = None
    data = chain_dataset(16)
    with torch.no_grad():
        own = sum(float(model(**{k: torch.tensor(data[i:i + 4][k]) for k in ("input_ids", "attention_mask", "labels")}).loss)
                  for i in range(0, 16, 4)) / 4
    trainer_cls = type("MeanLossTrainer", (LossItemsMixin, Trainer), {})
    args = tiny_args(tmp_path, per_device_eval_batch_size=4)
    assert trainer_cls(model=model, args=args, eval_dataset=data).evaluate()["eval_loss"] == pytest.approx(own, rel=1e-6)
    assert BADMTrainer(model=model, args=args, eval_dataset=data).evaluate()["eval_loss"] == pytest.approx(own, rel=1e-6)
    for optimizer in ("adamw_torch", "muon", "badm"):
        assert issubclass(_trainer_class("pretrain", optimizer), LossItemsMixin)
        assert issubclass(_trainer_class("sft", optimizer), LossItemsMixin)
