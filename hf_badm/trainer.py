"""BADMTrainerMixin / BADMTrainer: BADM inside ``transformers.Trainer`` (and TRL trainers via the mixin).

Fused mode: the Trainer's own gradient accumulation and data-parallel reduction compute the weighted
mean gradient, which is all fused BADM needs; the mixin only creates the optimizer and logs.

Per-sub-batch mode: every micro-batch of a gradient-accumulation group, and each of its
``sub_batches_per_micro_batch`` splits, is one BADM sub-batch with its own slot. Each sub-batch goes
through the ``training_step`` of the class the mixin is mixed into (the Trainer's, TRL's, a user's), so
``accelerator.backward``, activation offloading, context parallelism and the step's housekeeping run
once per sub-batch; its mean-loss gradient (whatever scaling that step applies undone at the loss) is
clipped to ``max_grad_norm`` if set, then absorbed with its weight. Gradients are never reduced across
ranks (``no_sync`` on every sub-batch) because the optimizer's step sums the slot aggregates instead
(one collective). Each rank checkpoints its own slots
(``badm_slots_rank{r}-of-{world}.pt`` next to the Trainer's ``optimizer.pt``); resuming with another
world size or accumulation re-slots them (``reslot_state_dict``: exact for steady weights).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import inspect
import math
import os
import re
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import torch
import transformers
from packaging import version
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.utils import logging

from hf_badm.config import BADMConfig
from hf_badm.factory import badm_param_groups, build_badm, solve_report
from hf_badm.parallel import attach_engine_layouts, prepare_for_ranks
from hf_badm.parallel.reshard import (load_zero_state, save_zero_state, whole_zero_state_dict, zero_resume_problem,
                                      zero_state_world)
from hf_badm.parallel.zero import zero_optimizer_of
from hf_badm.optim import BADM
from hf_badm.optim.badm import reslot_state_dict

__all__ = ["LossItemsMixin", "BADMTrainerMixin", "BADMTrainer", "BADMMetricsCallback", "find_badm", "split_micro_batch", "count_loss_items"]

SLOT_FILE = "badm_slots_rank{rank}-of-{world}.pt"
ENGINE_COUNTERS = ("global_steps", "global_samples")  # a DeepSpeed engine's, kept with BADM's ZeRO state

logger = logging.get_logger(__name__)


# The private Trainer methods the mixin overrides, with the parameters the Trainer calls them with.
PRIVATE_HOOKS: dict[str, tuple[str, ...]] = {
    "_save_optimizer_and_scheduler": ("output_dir",),  # per-rank slot files next to optimizer.pt
    "_load_optimizer_and_scheduler": ("checkpoint",),  # this rank's slots, or re-slotted ones
    "_get_num_items_in_batch": ("batch_samples", "device"),  # loss items counted after the label shift
    "_load_scaler": ("checkpoint",),  # called by the re-partitioned resume (_prepare_for_training)
    # the CLI's CheckpointMixin (hf_badm.app.checkpoint): staged, verified checkpoints and one-line load failures
    "_save_checkpoint": ("model", "trial"),
    "_get_output_dir": ("trial",),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_load_rng_state": ("checkpoint",),
}
# Private attributes read where the installed transformers has them, each with what stands in where it does not.
PRIVATE_ATTRIBUTES: dict[str, str] = {
    "Trainer._loss_shifts_labels": "transformers >= 5: its loss counts shifted labels itself; absent: counted here",
    "module._is_expert_parallel": "an expert-parallel MoE module (refused for Newton-Schulz); absent: not sharded",
    "Trainer._rotate_checkpoints": "transformers 4.x rotates checkpoints with it; absent: trainer_utils' function",
}
# The version whose Trainer maps optimizer.pt onto the CPU on CPU ranks (before it, torch.load fails on 'cpu:0').
CPU_MAP_LOCATION_FIXED = version.Version("5.18")


# Called only on the transformers versions that have it (5.x): the re-partitioned resume of a DeepSpeed checkpoint
# saved on another world size, refused in one line where the Trainer lacks it.
RESHARD_HOOK = ("_prepare_for_training", ("max_steps", "train_dataloader", "resume_from_checkpoint"))


def hook_parameters(trainer_cls: type, name: str) -> tuple[str, ...] | None:
    """The parameters (after self) of the Trainer's method ``name``; None when it has none of that name."""
    method = getattr(trainer_cls, name, None)
    return tuple(inspect.signature(method).parameters)[1:] if callable(method) else None


def check_private_hooks(trainer_cls: type = Trainer) -> None:
    """Fail with one line when the installed Trainer lacks a private method the mixin overrides, or names its
    parameters otherwise: an override the Trainer never calls would silently change what is trained or saved."""
    for name, expected in PRIVATE_HOOKS.items():
        found = hook_parameters(trainer_cls, name)
        if found != expected:
            have = "does not have it" if found is None else f"has {name}({', '.join(found)})"
            raise RuntimeError(f"hf_badm needs Trainer.{name}({', '.join(expected)}), but the installed transformers "
                               f"{transformers.__version__} {have}; supported: transformers{supported_range('transformers')}")


def supported_range(package: str) -> str:
    """The version range of ``package`` that hf-badm declares (its pyproject.toml: the range CI tests)."""
    try:
        requires = metadata.requires("hf-badm") or []
    except metadata.PackageNotFoundError:
        return " as hf_badm's pyproject.toml says"
    spec = next((r for r in requires if re.fullmatch(rf"{package}\b[^;]*", r)), package)
    # metadata may list the bounds in any order: floor first, as pyproject.toml writes them
    return ",".join(sorted(spec[len(package):].strip().split(","), key=lambda bound: not bound.startswith(">")))


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
    """Adds BADM's ``badm_*`` metrics to the Trainer's training logs, and hands BADM the matrix layouts of an engine
    that partitions it (DeepSpeed ZeRO) when training begins: pass it to a Trainer whose BADM came through
    ``optimizers=`` or ``optimizer_cls_and_kwargs=`` (BADMTrainer and the mixin add it themselves).

    For ``Trainer(optimizers=create_badm_optimizer(...), callbacks=[BADMMetricsCallback()])`` (BADMTrainer and
    the mixin use it by themselves). The metrics are read right after each optimizer step, before the LR scheduler
    moves, so they describe the same step as the logged ``learning_rate``. They reach ``log_history``, the console
    and callbacks after this one; reporting integrations (``report_to``) run before user callbacks in the
    Trainer, so only BADMTrainer/the mixin hands the metrics to them too."""

    def __init__(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.optimizer = optimizer  # None: the Trainer's optimizer (the one passed through optimizers=)
        self._badm: BADM | None = None
        self._step_size: float | None = None  # group 0's lr of the step just taken

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        # The engine has partitioned BADM by now (DeepSpeed ZeRO's flat partitions): tell the orthogonaliser which
        # whole matrices each partition holds. A public hook, after the engine wraps the optimizer on every version.
        # The Trainer's optimizer (the engine's wrapper), not the BADM this callback was handed at creation.
        attach_engine_layouts(optimizer if optimizer is not None else self.optimizer)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        # only the step's lr here (the scheduler moves it next); the norms are computed when a log needs them
        self._badm = find_badm(self.optimizer if self.optimizer is not None else optimizer)
        if self._badm is not None:
            self._step_size = self._badm.main_group()["lr"]

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


def _observes_loss(compute_loss: Any) -> Any:
    """``compute_loss`` that, while :meth:`BADMTrainerMixin._mean_loss_gradient` runs, gives the loss it returns
    gradient 1/numel in backward and records it, at the outermost override only (a user subclass's, which
    :meth:`BADMTrainerMixin.__init_subclass__` wraps, or the mixin's own)."""

    @functools.wraps(compute_loss)
    def observed(self: Any, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        losses = self.__dict__.get("_mean_losses")
        if losses is None or self.__dict__.get("_inside_compute_loss"):
            return compute_loss(self, model, inputs, *args, **kwargs)
        self._inside_compute_loss = True
        try:
            out = compute_loss(self, model, inputs, *args, **kwargs)
        finally:
            self._inside_compute_loss = False
        loss = out[0] if isinstance(out, tuple) else out
        if loss.requires_grad:
            loss.register_hook(lambda grad: torch.full_like(grad, 1.0 / grad.numel()))
        losses.append(loss.detach())
        return out

    observed._observes_loss = True  # type: ignore[attr-defined]
    return observed


class LossItemsMixin:
    """Put before a Trainer class: the loss of a causal LM is averaged over the tokens it predicts.

    transformers' Trainer divides the summed loss by ``num_items_in_batch``, which it counts after the label shift
    only from 5.10 and only for a model that names its ``loss_type``. GPT-2 leaves it unset: the Trainer then counts
    every label, T per row of which T - 1 are predicted, and its training and evaluation losses are (T - 1) / T of
    the mean (0.984 of it at T = 64). With this mixin they are the mean. BADMTrainer counts this way (fused BADM steps
    on the mean gradient, per-sub-batch mode weights its slots by the same count), and ``hf-badm`` runs every
    comparison optimizer's Trainer with it, so that their losses compare with BADM's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_private_hooks()
        super().__init__(*args, **kwargs)
        self._items_shift_labels = _loss_shifts_labels(self.model) or bool(getattr(self, "_loss_shifts_labels", False))

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | int | None:
        if self._items_shift_labels and not getattr(self, "_loss_shifts_labels", False):
            batch_samples = [_shifted_labels(b) for b in batch_samples]
        return super()._get_num_items_in_batch(batch_samples, device)


class BADMTrainerMixin(LossItemsMixin):
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
        self._sub_batch_norms: list[torch.Tensor] = []  # of step self._norms_step, read when a log needs them
        self._norms_step = -1
        self._badm_metrics = BADMMetricsCallback()
        super().__init__(*args, **kwargs)
        self.add_callback(self._badm_metrics)
        self._check_badm_setup()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass's own ``compute_loss`` is observed too (per-sub-batch mode needs the loss the outermost override
        returns): wrapped once, where the class is made, never on a live trainer."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("compute_loss")
        if own is not None and not getattr(own, "_observes_loss", False):
            cls.compute_loss = _observes_loss(own)

    @_observes_loss
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        return super().compute_loss(model, inputs, *args, **kwargs)

    @contextlib.contextmanager
    def _mean_loss_gradient(self) -> Iterator[list[torch.Tensor]]:
        """While a training step runs: the loss ``compute_loss`` returns (the outermost override, a user subclass's
        included) gets gradient 1/numel in backward, whatever the step scales it by before (gradient accumulation,
        DataParallel's mean), so the parameters' gradients are exactly the mean loss's. Yields the losses seen."""
        self._mean_losses: list[torch.Tensor] | None = []
        try:
            yield self._mean_losses
        finally:
            self._mean_losses = None

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
        refusal = self.badm_config.engine_refusal(deepspeed=self.is_deepspeed_enabled, fsdp=self.is_fsdp_enabled,
                                                  fp16=self.args.fp16)
        if refusal is not None:
            raise ValueError(refusal)

    # ------------------------------------------------------------------ per-sub-batch checkpoints
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        zero = zero_optimizer_of(self.optimizer)
        if zero is not None:  # DeepSpeed's files load on this world size only: BADM's own pieces, by parameter name
            os.makedirs(output_dir, exist_ok=True)
            engine = {key: getattr(self.model_wrapped, key) for key in ENGINE_COUNTERS}
            save_zero_state(zero, output_dir, self.args.process_index, self.args.world_size, engine)
            torch.distributed.barrier()  # every rank's pieces are in before rank 0 writes trainer_state.json
        opt = self._per_sub_batch_optimizer()
        if opt is not None and self.args.world_size > 1:  # the Trainer's optimizer.pt holds rank 0's slots only
            os.makedirs(output_dir, exist_ok=True)
            path = os.path.join(output_dir, SLOT_FILE.format(rank=self.args.process_index, world=self.args.world_size))
            torch.save(opt.state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)  # a slot file is there whole or not at all
            # rank 0 writes trainer_state.json (what marks a checkpoint) after this: every rank's slots come first
            torch.distributed.barrier()

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's ``train``; a checkpoint that cannot resume exactly here (a DeepSpeed one on another world
        size without BADM's state files, under bf16/fp16, another engine's, ...) is refused first, in one line, before
        anything runs."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str):
            engine = "deepspeed" if self.is_deepspeed_enabled else "fsdp" if self.is_fsdp_enabled else None
            problem = zero_resume_problem(checkpoint, self.args.world_size, engine=engine,
                                          mixed_precision=self.args.bf16 or self.args.fp16,
                                          can_reshard=hook_parameters(Trainer, RESHARD_HOOK[0]) == RESHARD_HOOK[1])
            if problem is not None:
                raise ValueError(f"resume_from_checkpoint: {problem}")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: str | None) -> Any:
        """A DeepSpeed checkpoint of another world size (DeepSpeed's own files load on their world size only): the
        engine is prepared without it, then the fp32 weights and BADM's state are re-partitioned from BADM's own files
        (transformers 5; older versions are refused in :meth:`train`)."""
        if resume_from_checkpoint is None or not self.is_deepspeed_enabled or zero_state_world(
                resume_from_checkpoint) in (None, self.args.world_size):
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        counters = load_zero_state(zero_optimizer_of(self.optimizer), resume_from_checkpoint)
        for key in ENGINE_COUNTERS:  # the engine's own step count names its next checkpoint folder (global_stepN)
            setattr(self.model_wrapped, key, counters[key])
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        self._load_scaler(resume_from_checkpoint)
        return model, train_dataloader

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The Trainer loads optimizer.pt (rank 0's slots); per-sub-batch then takes this rank's own slots
        when the layout (world size, slots per rank) is unchanged, and re-slots all ranks' otherwise. A DeepSpeed
        checkpoint resumed without the engine takes BADM's whole state from its ZeRO state files."""
        if checkpoint is not None and not self.is_deepspeed_enabled and zero_state_world(checkpoint) is not None:
            names = {p: n for n, p in self.model.named_parameters()}
            self.badm_optimizer.load_state_dict(whole_zero_state_dict(checkpoint, self.badm_optimizer, names))
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))
            return
        if checkpoint is not None and self._cpu_ranks_without_engine():
            _load_on_cpu(self.optimizer, self.lr_scheduler, checkpoint)
        else:
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

    def _cpu_ranks_without_engine(self) -> bool:
        # transformers < 5.18 maps optimizer.pt to args.device, which on CPU ranks is 'cpu:0': torch.load cannot
        # restore that location, so the Trainer's own load fails on every CPU multi-process resume
        return (version.Version(transformers.__version__) < CPU_MAP_LOCATION_FIXED and self.args.world_size > 1
                and self.args.device.type == "cpu" and not (self.is_deepspeed_enabled or self.is_fsdp_enabled))

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """BADM over the trainable parameters (the Trainer's decay rule); on several ranks it gets what it needs
        there (``prepare_for_ranks``) here, once, whichever way the optimizer came in."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = badm_param_groups(opt_model, self.args.weight_decay, self.get_decay_parameter_names(opt_model),
                                       self.badm_config)
            self.optimizer = build_badm(groups, self.badm_config, self.args)
            if self.args.should_log:  # what went where, once, before training: one line, and every tensor at debug
                report = solve_report(opt_model, self.badm_config)
                logger.info(str(report))
                logger.debug("hf_badm: every trainable tensor's role and solve:\n%s", report.listing())
        opt = find_badm(self.optimizer)
        if opt is not None:
            prepare_for_ranks(opt, self.args.world_size, **self.badm_config.parallel_kwargs())
        self._badm_metrics.optimizer = self.optimizer
        return self.optimizer

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
        """Per-sub-batch: the step of the class mixed into (the Trainer's, TRL's, ...) once per sub-batch under
        ``no_sync``, each sub-batch's mean-loss gradient then clipped and absorbed into its slot."""
        opt = self._per_sub_batch_optimizer()
        if opt is None:
            return super().training_step(model, inputs, num_items_in_batch)
        cfg = self.badm_config
        total = float(num_items_in_batch) if num_items_in_batch is not None and cfg.sub_batch_weights == "items" else None
        world = self.args.world_size if self.args.average_tokens_across_devices else 1
        params = [p for group in opt.param_groups for p in group["params"]]
        norm_cap = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else math.inf
        if self._norms_step != self.state.global_step:  # the first micro-batch of a step
            self._sub_batch_norms, self._norms_step = [], self.state.global_step
        logged = torch.zeros((), device=self.args.device)
        for sub in split_micro_batch(inputs, cfg.sub_batches_per_micro_batch):
            items = count_loss_items(sub, self._items_shift_labels) if cfg.sub_batch_weights == "items" else None
            if items == 0:  # no loss items: the mean loss is undefined, the sub-batch weighs nothing
                opt.absorb_sub_batch(0.0)
                continue
            # num_items_in_batch=None: compute_loss returns the sub-batch's mean loss over its own items
            with self.accelerator.no_sync(model), self._mean_loss_gradient() as losses:
                super().training_step(model, sub, None)
            if len(losses) != 1:
                raise RuntimeError(f"per_sub_batch mode needs one compute_loss call per training_step, but "
                                   f"{type(self).__name__}.training_step made {len(losses)}: use mode='fused'")
            # kept as a tensor: read once per logged step, not a device sync per sub-batch
            self._sub_batch_norms.append(torch.nn.utils.clip_grad_norm_(params, norm_cap).detach())
            weight = 1.0 if cfg.sub_batch_weights == "uniform" else float(items if items is not None else _batch_len(sub))
            opt.absorb_sub_batch(weight)
            share = weight * world / total if total else 1.0 / (self.current_gradient_accumulation_steps *
                                                                 cfg.sub_batches_per_micro_batch)
            logged += losses[0].mean() * share
        return logged

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """badm_* metrics of the step just taken (read by the callback before the scheduler moved), added before
        any callback or reporting integration sees the logs."""
        if "loss" in logs:
            logs = {**logs, **self._badm_metrics.latest}
            norms = self._sub_batch_norms if self._norms_step == self.state.global_step - 1 else []
            if self._per_sub_batch_optimizer() is not None and norms:  # the Trainer saw only absorbed, cleared grads
                logs["grad_norm"] = math.sqrt(sum(float(n) ** 2 for n in norms) / len(norms))
        super().log(logs, *args, **kwargs)


def _loss_shifts_labels(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    config = getattr(base, "config", None)
    return getattr(base, "loss_function", None) is ForCausalLMLoss and not getattr(config, "is_encoder_decoder", False)


def _batch_len(inputs: dict[str, Any]) -> int:
    return next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


def _load_on_cpu(optimizer: torch.optim.Optimizer, scheduler: Any, checkpoint: str) -> None:
    """The Trainer's load of optimizer.pt and scheduler.pt (when both are there), mapped to the CPU."""
    paths = [os.path.join(checkpoint, name) for name in (OPTIMIZER_NAME, SCHEDULER_NAME)]
    if all(os.path.isfile(path) for path in paths):
        optimizer.load_state_dict(torch.load(paths[0], map_location="cpu", weights_only=True))
        scheduler.load_state_dict(torch.load(paths[1], map_location="cpu", weights_only=True))


def _shifted_labels(batch: Any) -> Any:
    """A micro-batch as the Trainer's item count should see it: the labels a causal LM's loss really averages."""
    if not isinstance(batch, dict) or not isinstance(batch.get("labels"), torch.Tensor):
        return batch
    return {"labels": batch["shift_labels"] if "shift_labels" in batch else batch["labels"][..., 1:]}


class BADMTrainer(BADMTrainerMixin, Trainer):
    """``transformers.Trainer`` with BADM: ``BADMTrainer(model=..., args=..., badm_config=BADMConfig(...))``."""
