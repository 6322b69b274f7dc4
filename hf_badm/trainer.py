"""BADMTrainerMixin / BADMTrainer: BADM inside ``transformers.Trainer`` (and TRL trainers via the mixin).

Fused mode: the Trainer's own gradient accumulation and data-parallel reduction compute the weighted
mean gradient, which is all fused BADM needs; the mixin only creates the optimizer and logs.

Per-sub-batch mode: every micro-batch of a gradient-accumulation group, and each of its
``sub_batches_per_micro_batch`` splits, is one BADM sub-batch with its own slot. Its mean-loss
gradient (no accumulation scaling) is clipped to ``max_grad_norm`` if set, then absorbed with its
weight; gradients are never reduced across ranks (``no_sync`` on every micro-step) because the
optimizer's step sums the slot aggregates instead (one collective). Each rank checkpoints its own slots
(``badm_slots_rank{r}-of-{world}.pt`` next to the Trainer's ``optimizer.pt``); resuming with another
world size or accumulation re-slots them (``reslot_state_dict``: exact for steady weights).
"""

from __future__ import annotations

import glob
import math
import os
import re
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.loss.loss_utils import ForCausalLMLoss

from hf_badm.config import BADMConfig
from hf_badm.distributed import attach_zero_layouts, prepare_for_ranks
from hf_badm.factory import badm_param_groups
from hf_badm.optim import BADM
from hf_badm.optim.badm import reslot_state_dict

__all__ = ["BADMTrainerMixin", "BADMTrainer", "BADMMetricsCallback", "find_badm", "split_micro_batch", "count_loss_items"]

SLOT_FILE = "badm_slots_rank{rank}-of-{world}.pt"


def split_micro_batch(inputs: dict[str, Any], k: int) -> list[dict[str, Any]]:
    """Split every batch-dimension tensor of a micro-batch into ``k`` contiguous sub-batches."""
    if k == 1:
        return [inputs]
    sizes = {v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"cannot split a micro-batch whose tensors disagree on the batch size: {sorted(sizes)}")
    (n,) = sizes
    if n < k:
        raise ValueError(f"sub_batches_per_micro_batch={k} exceeds the micro-batch size {n}")
    parts: list[dict[str, Any]] = [{} for _ in range(k)]
    for key, value in inputs.items():
        chunks = torch.tensor_split(value, k) if isinstance(value, torch.Tensor) and value.dim() > 0 else [value] * k
        for part, chunk in zip(parts, chunks):
            part[key] = chunk
    return parts


def count_loss_items(inputs: dict[str, Any], shifts_labels: bool) -> int | None:
    """Loss items of a sub-batch, counted as the Trainer counts ``num_items_in_batch``."""
    if "shift_labels" in inputs:
        labels = inputs["shift_labels"]
    elif "labels" in inputs and isinstance(inputs["labels"], torch.Tensor):
        labels = inputs["labels"][..., 1:] if shifts_labels else inputs["labels"]
    else:
        return None
    return int(labels.ne(-100).sum())


def find_badm(optimizer: Any) -> BADM | None:
    """The BADM inside an optimizer wrapper (Accelerate's, DeepSpeed's ZeRO optimizer), or None."""
    while optimizer is not None and not isinstance(optimizer, BADM) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer if isinstance(optimizer, BADM) else None


class BADMMetricsCallback(TrainerCallback):
    """Adds BADM's ``badm_*`` metrics to the Trainer's training logs.

    For ``Trainer(optimizers=create_badm_optimizer(...), callbacks=[BADMMetricsCallback()])`` (BADMTrainer and
    the mixin use it by themselves). The metrics are read right after each optimizer step, before the LR scheduler
    moves, so they describe the same step as the logged ``learning_rate``. They reach ``log_history``, the console
    and callbacks after this one; reporting integrations (``report_to``) run before user callbacks in the
    Trainer, so only BADMTrainer/the mixin hands the metrics to them too."""

    def __init__(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.optimizer = optimizer  # None: the Trainer's optimizer (the one passed through optimizers=)
        self._badm: BADM | None = None
        self._step_size: float | None = None  # group 0's lr of the step just taken

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        # only the step's lr here (the scheduler moves it next); the norms are computed when a log needs them
        self._badm = find_badm(self.optimizer if self.optimizer is not None else optimizer)
        if self._badm is not None:
            self._step_size = self._badm.param_groups[0]["lr"]

    @property
    def latest(self) -> dict[str, float]:
        """The metrics of the step just taken (empty before the first one)."""
        if self._badm is None or self._step_size is None:
            return {}
        return {**self._badm.metrics(), "badm_step_size": self._step_size}

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs or "badm_step_size" in logs:  # BADMTrainer.log added them already
            return
        missing = {k: v for k, v in self.latest.items() if k not in logs}
        logs.update(missing)
        if state.log_history:
            state.log_history[-1].update(missing)


class BADMTrainerMixin:
    """Put before a Trainer class: ``class BADMSFTTrainer(BADMTrainerMixin, SFTTrainer): ...``.

    Takes ``badm_config=BADMConfig(...)``. Creates BADM in ``create_optimizer`` (so the DeepSpeed and
    FSDP creation paths use it), runs per-sub-batch mode's absorb loop in ``training_step``, and adds
    ``badm_*`` metrics (step size 1/sigma_t, beta, dual norm, sub-batches per step, skipped steps) to the logs.
    Clipping: fused clips the reduced gradient by global norm (the Trainer's usual clip);
    per-sub-batch clips each sub-batch's gradient to ``max_grad_norm`` before absorbing it, and
    logs the root-mean-square of the sub-batch norms as ``grad_norm``.
    """

    def __init__(self, *args: Any, badm_config: BADMConfig | None = None, **kwargs: Any) -> None:
        self.badm_config = badm_config if badm_config is not None else BADMConfig()
        if not isinstance(self.badm_config, BADMConfig):
            raise TypeError(f"badm_config must be a BADMConfig, got {type(self.badm_config).__name__}")
        self._sub_batch_norms: list[torch.Tensor] = []
        self._badm_metrics = BADMMetricsCallback()
        super().__init__(*args, **kwargs)
        self.add_callback(self._badm_metrics)
        # Per-sub-batch weights count loss items the way the model's loss really works: a causal LM whose config
        # leaves loss_type unset (GPT-2) still shifts its labels, which the Trainer's own flag misses.
        self._badm_shifts_labels = _loss_shifts_labels(self.model) or bool(getattr(self, "_loss_shifts_labels", False))
        self._check_badm_setup()

    # ------------------------------------------------------------------ set-up
    def _check_badm_setup(self) -> None:
        """Fail before the first step for combinations that cannot be exact."""
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("the model has no trainable parameters: unfreeze some, or add PEFT adapters")
        if self.is_deepspeed_enabled:
            ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
            if "optimizer" in ds:
                raise ValueError("the DeepSpeed config has an 'optimizer' section, so DeepSpeed would train with its own "
                                 "optimizer instead of BADM: remove it (BADMTrainer hands BADM to DeepSpeed)")
            if ds.get("zero_optimization", {}).get("stage", 0) and not ds.get("zero_allow_untested_optimizer"):
                raise ValueError('DeepSpeed ZeRO takes BADM as its (client) optimizer only with '
                                 '"zero_allow_untested_optimizer": true in the DeepSpeed config')
        if self.badm_config.mode != "per_sub_batch":
            return
        if self.is_deepspeed_enabled:
            raise ValueError('per_sub_batch mode absorbs each sub-batch\'s own gradient, but DeepSpeed (every ZeRO stage) '
                             'reduces gradients and steps the optimizer inside its engine: use BADMConfig(mode="fused") '
                             'with DeepSpeed, or per_sub_batch under plain data parallelism (DDP)')
        if self.is_fsdp_enabled:
            raise ValueError('per_sub_batch mode needs whole, un-reduced sub-batch gradients, but FSDP reduce-scatters '
                             'and shards them: use BADMConfig(mode="fused") with FSDP, or per_sub_batch under DDP')
        if self.args.fp16:
            raise ValueError('per_sub_batch mode absorbs gradients as they are, and fp16 loss scaling would leave them '
                             'scaled: use bf16, or BADMConfig(mode="fused") with fp16')

    # ------------------------------------------------------------------ per-sub-batch checkpoints
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        opt = self._per_sub_batch_optimizer()
        if opt is not None and self.args.world_size > 1:  # the Trainer's optimizer.pt holds rank 0's slots only
            os.makedirs(output_dir, exist_ok=True)
            path = os.path.join(output_dir, SLOT_FILE.format(rank=self.args.process_index, world=self.args.world_size))
            torch.save(opt.state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)  # a slot file is there whole or not at all
            # rank 0 writes trainer_state.json (what marks a checkpoint) after this: every rank's slots come first
            torch.distributed.barrier()

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The Trainer loads optimizer.pt (rank 0's slots); per-sub-batch then takes this rank's own slots
        when the layout (world size, slots per rank) is unchanged, and re-slots all ranks' otherwise."""
        super()._load_optimizer_and_scheduler(checkpoint)
        opt = self._per_sub_batch_optimizer()
        if checkpoint is None or opt is None or not opt.state:
            return
        found = glob.glob(os.path.join(checkpoint, SLOT_FILE.format(rank="*", world="*")))
        saved_world = int(re.search(r"-of-(\d+)\.pt$", found[0]).group(1)) if found else 1
        files = [os.path.join(checkpoint, SLOT_FILE.format(rank=r, world=saved_world)) for r in range(saved_world)]
        slots = self.args.gradient_accumulation_steps * self.badm_config.sub_batches_per_micro_batch
        rank, world = self.args.process_index, self.args.world_size
        if saved_world == world and opt.slots == slots:
            if world > 1:
                opt.load_state_dict(torch.load(files[rank], map_location="cpu", weights_only=True))
            return
        if saved_world == 1:
            states = [opt.state_dict()]
        else:
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise FileNotFoundError(f"resuming per_sub_batch with another layout re-slots every rank's slots, but "
                                        f"{missing} are not visible here (checkpoints on a shared filesystem?)")
            states = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
        opt.load_state_dict(reslot_state_dict(states, slots))

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """BADM over the trainable parameters (the Trainer's decay rule); on several ranks it gets what it needs
        there (``prepare_for_ranks``) here, once, whichever way the optimizer came in."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = badm_param_groups(opt_model, self.args.weight_decay, self.get_decay_parameter_names(opt_model),
                                       self.badm_config)
            self.optimizer = BADM(groups, **self.badm_config.optimizer_kwargs(self.args.learning_rate))
        opt = find_badm(self.optimizer)
        if opt is not None:
            prepare_for_ranks(opt, self.args.world_size)
        self._badm_metrics.optimizer = self.optimizer
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """The Trainer's scheduler; under DeepSpeed this is the first hook after ZeRO has partitioned BADM's
        groups, so the flat partitions of newton_schulz groups learn here which whole matrices they hold."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        zero = self.optimizer
        while zero is not None and not isinstance(getattr(zero, "optimizer", None), BADM):
            zero = getattr(zero, "optimizer", None)
        if self.is_deepspeed_enabled and zero is not None and self.badm_config.preconditioner == "newton_schulz":
            attach_zero_layouts(zero)
        return scheduler

    @property
    def badm_optimizer(self) -> BADM | None:
        """The BADM this trainer steps (unwrapped from Accelerate's or DeepSpeed's wrapper), None before creation."""
        return find_badm(self.optimizer)

    def _per_sub_batch_optimizer(self) -> BADM | None:
        opt = self.badm_optimizer
        return opt if opt is not None and opt.mode == "per_sub_batch" else None

    # ------------------------------------------------------------------ the per-sub-batch loop
    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        opt = self._per_sub_batch_optimizer()
        if opt is None:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        cfg = self.badm_config
        total = float(num_items_in_batch) if num_items_in_batch is not None and cfg.sub_batch_weights == "items" else None
        world = self.args.world_size if self.args.average_tokens_across_devices else 1
        params = [p for group in opt.param_groups for p in group["params"]]
        norm_cap = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else math.inf
        logged = torch.zeros((), device=self.args.device)
        with self.accelerator.no_sync(model):
            for sub in split_micro_batch(inputs, cfg.sub_batches_per_micro_batch):
                items = count_loss_items(sub, self._badm_shifts_labels) if cfg.sub_batch_weights == "items" else None
                if items == 0:  # no loss items: the mean loss is undefined, the sub-batch weighs nothing
                    opt.absorb_sub_batch(0.0)
                    continue
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, sub)  # the sub-batch's mean loss over its own items
                if self.args.n_gpu > 1:
                    loss = loss.mean()
                loss.backward()
                # kept as a tensor: read once per step in _get_grad_norm, not a device sync per sub-batch
                self._sub_batch_norms.append(torch.nn.utils.clip_grad_norm_(params, norm_cap).detach())
                weight = 1.0 if cfg.sub_batch_weights == "uniform" else float(items if items is not None else _batch_len(sub))
                opt.absorb_sub_batch(weight)
                share = weight * world / total if total else 1.0 / (self.current_gradient_accumulation_steps *
                                                                     cfg.sub_batches_per_micro_batch)
                logged += loss.detach() * share
        return logged

    def _clip_grad_norm(self, model: nn.Module) -> torch.Tensor | None:
        if self._per_sub_batch_optimizer() is not None:
            return None  # each sub-batch was clipped before it was absorbed
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        if self._per_sub_batch_optimizer() is None:
            return super()._get_grad_norm(model, grad_norm=grad_norm)
        norms, self._sub_batch_norms = self._sub_batch_norms, []
        return math.sqrt(sum(float(n) ** 2 for n in norms) / len(norms)) if norms else 0.0

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """badm_* metrics of the step just taken (read by the callback before the scheduler moved), added before
        any callback or reporting integration sees the logs."""
        if "loss" in logs:
            logs = {**logs, **self._badm_metrics.latest}
        super().log(logs, *args, **kwargs)


def _loss_shifts_labels(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    config = getattr(base, "config", None)
    return getattr(base, "loss_function", None) is ForCausalLMLoss and not getattr(config, "is_encoder_decoder", False)


def _batch_len(inputs: dict[str, Any]) -> int:
    return next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


class BADMTrainer(BADMTrainerMixin, Trainer):
    """``transformers.Trainer`` with BADM: ``BADMTrainer(model=..., args=..., badm_config=BADMConfig(...))``."""
