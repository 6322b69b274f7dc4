"""create_badm_optimizer: BADM for a plain ``transformers.Trainer`` (``optimizers=`` or ``optimizer_cls_and_kwargs=``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainingArguments, get_scheduler
from transformers.trainer_pt_utils import get_parameter_names

from hf_badm.config import BADMConfig
from hf_badm.distributed import prepare_for_ranks
from hf_badm.optim import BADM, ns_applies

__all__ = ["create_badm_optimizer", "badm_optimizer_cls_and_kwargs", "badm_param_groups", "decay_parameter_names"]

# The Trainer's no-decay rule (``Trainer.get_decay_parameter_names``): biases and norm weights. Kept equal to it by
# tests/test_trainer.py, so that a plain Trainer, BADMTrainer and create_badm_optimizer decay the same tensors.
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that take weight decay, by the Trainer's rule, without a Trainer."""
    return get_parameter_names(model, [nn.LayerNorm], _NO_DECAY_PATTERNS)


def badm_param_groups(model: nn.Module, weight_decay: float, decay_names: list[str] | None = None,
                      config: BADMConfig | None = None) -> list[dict]:
    """Trainable parameters only, split into decay / no-decay groups by the Trainer's own rule
    (``Trainer.get_decay_parameter_names``: biases and norm weights get no decay). With the
    newton_schulz preconditioner, tensors other than hidden weight matrices (embeddings, the LM head,
    1-D tensors) go to groups of their own with second_moment and ``config.group_overrides()``."""
    decay = set(decay_parameter_names(model) if decay_names is None else decay_names)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters (requires_grad=False everywhere): "
                         "unfreeze some, or add PEFT adapters, before creating the optimizer")
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    if config is not None and config.preconditioner == "newton_schulz":
        embeddings = _embedding_ids(model)
        hidden = [{**g, "params": [p for p in g["params"] if ns_applies(p) and id(p) not in embeddings]} for g in groups]
        rest = [{**g, **config.group_overrides(),
                 "params": [p for p in g["params"] if not ns_applies(p) or id(p) in embeddings]} for g in groups]
        groups = hidden + rest
    return [g for g in groups if g["params"]]


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


def _split_config(badm_kwargs: dict[str, Any]) -> tuple[BADMConfig, dict[str, Any]]:
    """Accept BADMConfig fields (or ``badm_config=``) and pass the optimizer's own extras through."""
    config = badm_kwargs.pop("badm_config", None)
    fields = set(BADMConfig.__dataclass_fields__)
    chosen = {k: badm_kwargs.pop(k) for k in list(badm_kwargs) if k in fields}
    if config is None:
        config = BADMConfig(**chosen)
    elif chosen:
        raise ValueError(f"give BADM options either in badm_config or as keywords, not both: {sorted(chosen)}")
    return config, badm_kwargs


def badm_optimizer_cls_and_kwargs(args: TrainingArguments, **badm_kwargs: Any) -> tuple[type[BADM], dict[str, Any]]:
    """``(BADM, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``; the Trainer builds the
    decay groups with ``args.weight_decay`` itself. Keywords are BADMConfig fields (or ``badm_config=``)."""
    config, extra = _split_config(dict(badm_kwargs))
    if config.preconditioner == "newton_schulz":
        raise ValueError("optimizer_cls_and_kwargs= cannot take preconditioner='newton_schulz': the Trainer builds the "
                         "param groups itself, so embeddings and the LM head would be orthogonalised like hidden "
                         "matrices. Use BADMTrainer(badm_config=BADMConfig(preconditioner='newton_schulz')) (works on "
                         "every engine) or optimizers=create_badm_optimizer(model, args, preconditioner='newton_schulz')")
    return BADM, {**config.optimizer_kwargs(args.learning_rate), **extra}


def create_badm_optimizer(
    model: nn.Module,
    args: TrainingArguments,
    num_training_steps: int | None = None,
    **badm_kwargs: Any,
) -> tuple[BADM, torch.optim.lr_scheduler.LRScheduler | None]:
    """BADM over the model's trainable parameters and the Trainer's LR schedule, for
    ``Trainer(optimizers=create_badm_optimizer(model, args))``.

    ``badm_kwargs`` are BADMConfig fields (``sigma``, ``rho``, ``mode``, ...; or ``badm_config=``) and
    BADM extras (``foreach``). ``sigma`` defaults to ``1/args.learning_rate`` and ``rho`` to
    ``9*sigma`` (beta 0.9); weight decay is ``args.weight_decay``. The scheduler is transformers'
    ``get_scheduler(args.lr_scheduler_type, ...)`` with the args' warmup over ``num_training_steps``
    (default ``args.max_steps``); when neither is known it is ``None`` and the Trainer builds the same
    schedule itself once it knows the length of training.
    """
    if getattr(args, "deepspeed_plugin", None) is not None:
        raise ValueError(
            "Trainer(optimizers=create_badm_optimizer(...)) cannot run under DeepSpeed: the Trainer discards an optimizer "
            "passed through optimizers= when it initialises DeepSpeed and trains with its default AdamW instead, at "
            "BADM's learning rate. Use BADMTrainer(badm_config=BADMConfig(...)) (or the BADMTrainerMixin), or "
            "Trainer(optimizer_cls_and_kwargs=badm_optimizer_cls_and_kwargs(args, ...)): both create BADM where "
            "DeepSpeed takes it")
    config, extra = _split_config(dict(badm_kwargs))
    optimizer = BADM(badm_param_groups(model, args.weight_decay, config=config),
                     **config.optimizer_kwargs(args.learning_rate), **extra)
    prepare_for_ranks(optimizer, args.world_size)
    steps = num_training_steps if num_training_steps is not None else args.max_steps
    if steps is None or steps <= 0:
        return optimizer, None
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(steps),
        num_training_steps=steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
    )
    return optimizer, scheduler
