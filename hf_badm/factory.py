"""create_badm_optimizer: BADM for a plain ``transformers.Trainer`` (``optimizers=`` or ``optimizer_cls_and_kwargs=``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import TrainingArguments, get_scheduler
from transformers.trainer_pt_utils import get_parameter_names

from hf_badm.config import BADMConfig
from hf_badm.optim import BADM, LOCAL_SOLVES
from hf_badm.optim.solves.newton_schulz import register_matrix_view
from hf_badm.parallel import full_shape, prepare_for_ranks
from hf_badm.roles import TensorRole, tensor_roles

__all__ = ["create_badm_optimizer", "badm_optimizer_cls_and_kwargs", "badm_param_groups", "decay_parameter_names",
           "split_by_solve", "ModelGroupedBADM", "SolveReport", "solve_report", "refuse_deepspeed", "trainer_scheduler"]

# The Trainer's no-decay rule (``Trainer.get_decay_parameter_names``): biases and norm weights. Kept equal to it by
# tests/test_trainer.py, so that a plain Trainer, BADMTrainer and create_badm_optimizer decay the same tensors.
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that take weight decay, by the Trainer's rule, without a Trainer."""
    return get_parameter_names(model, [nn.LayerNorm], _NO_DECAY_PATTERNS)


def badm_param_groups(model: nn.Module, weight_decay: float, decay_names: list[str] | None = None,
                      config: BADMConfig | None = None, *, require_matrix: bool = True) -> list[dict]:
    """Trainable parameters only, split into decay / no-decay groups by the Trainer's own rule
    (``Trainer.get_decay_parameter_names``: biases and norm weights get no decay). With an orthogonalising
    preconditioner (newton_schulz), the hidden weight matrices and stacks of expert matrices, judged by their whole
    shape (:func:`hf_badm.parallel.full_shape`, so a ZeRO-3 partition made by ``zero.Init`` counts as the matrix it
    is), go to ``strict`` groups (a tensor there that cannot be orthogonalised is an error at the first step, never a
    silent other solve); embeddings, the LM head and 1-D tensors go to groups of their own with
    ``config.group_overrides()``. Asking to orthogonalise a model with no such matrix is an error (unless
    ``require_matrix=False``: the Muon peer then takes AdamW alone)."""
    decay = set(decay_parameter_names(model) if decay_names is None else decay_names)
    solves = _assign_solves(model, config, require_matrix)
    named = [(role.name, p) for role, (p, _) in solves.items()]
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    return split_by_solve(groups, {id(p): solve for p, solve in solves.values()}, config)


def split_by_solve(groups: list[dict], solve_of: dict[int, str], config: BADMConfig | None) -> list[dict]:
    """Each group split by its tensors' local solves (``solve_of``: by ``id`` of the tensor), each part with its
    solve's group settings (:func:`_solve_settings`); empty parts dropped."""
    out = [{**g, **settings, "params": [p for p in g["params"] if solve_of[id(p)] == name]}
           for name, settings in _solve_settings(config).items() for g in groups]
    return [g for g in out if g["params"]]


@dataclass(frozen=True)
class SolveReport:
    """What went where: per local solve the count of tensors and of parameters, the names of the 2-D/3-D weights
    that took an elementwise solve although a matrix solve was asked for (embeddings, the LM head, convolution
    kernels, state-space tables, and ``unrecognised``: tensors no rule of :mod:`hf_badm.roles` knows), and every
    tensor's :class:`~hf_badm.roles.TensorRole` with its solve (``routes``). ``str()`` is the one line the CLI prints
    and BADMTrainer logs; :meth:`listing` the full table."""

    tensors: dict[str, int]
    parameters: dict[str, int]
    elementwise_matrices: tuple[str, ...]
    unrecognised: tuple[str, ...] = ()
    routes: tuple[tuple[TensorRole, str], ...] = ()

    def __str__(self) -> str:
        solves = ", ".join(f"{name} {self.tensors[name]} tensors ({self.parameters[name]:,} parameters)"
                           for name in self.tensors)
        line = f"hf_badm: local solves: {solves}"
        split = sum(bool(role.parts) for role, _ in self.routes)
        if split:
            line += f"; {split} fused projections split into their parts"
        if self.elementwise_matrices:
            line += f"; matrices left elementwise: {', '.join(self.elementwise_matrices)}"
        if self.unrecognised:
            line += f"; {len(self.unrecognised)} not recognised (left elementwise): {', '.join(self.unrecognised)}"
        return line

    def listing(self) -> str:
        """Every trainable tensor, one tab-separated line each: name, shape, role, solve, parts (a header first)."""
        rows = ["name\tshape\trole\tsolve\tparts"]
        rows += [f"{r.name}\t{'x'.join(map(str, r.shape))}\t{r.role}\t{solve}\t{','.join(r.parts)}"
                 for r, solve in self.routes]
        return "\n".join(rows) + "\n"


def solve_report(model: nn.Module, config: BADMConfig | None = None) -> SolveReport:
    """The :class:`SolveReport` of the groups ``badm_param_groups(model, ..., config=config)`` makes."""
    tensors = dict.fromkeys(_solve_settings(config), 0)
    parameters = dict.fromkeys(_solve_settings(config), 0)
    asked = LOCAL_SOLVES[(config or BADMConfig()).preconditioner]
    routes = [(role, solve) for role, (_, solve) in _assign_solves(model, config, register=False).items()]
    for role, solve in routes:
        tensors[solve] += 1
        parameters[solve] += math.prod(role.shape)
    left = tuple(r.name for r, solve in routes if asked.orthogonalises and solve != asked.name and len(r.shape) > 1)
    return SolveReport(tensors, parameters, left, tuple(r.name for r, _ in routes if r.role == "unknown"), tuple(routes))


def _solve_settings(config: BADMConfig | None) -> dict[str, dict[str, Any]]:
    """The group settings of each local solve a model's tensors can take under ``config``."""
    if config is None or not LOCAL_SOLVES[config.preconditioner].orthogonalises:
        return {(config or BADMConfig()).preconditioner: {}}
    overrides = config.group_overrides()
    return {config.preconditioner: {"strict": True}, overrides["preconditioner"]: overrides}


def _assign_solves(model: nn.Module, config: BADMConfig | None, require_matrix: bool = True, *,
                   register: bool = True) -> dict[TensorRole, tuple[nn.Parameter, str]]:
    """Each trainable parameter's role and local solve: the orthogonalising solve for the linear maps
    (:func:`hf_badm.roles.tensor_roles`), whose maps are registered for the orthogonaliser (``register``), the
    elementwise one for the rest."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters (requires_grad=False everywhere): "
                         "unfreeze some, or add PEFT adapters, before creating the optimizer")
    first, *rest = _solve_settings(config)
    if not rest:
        return {TensorRole(n, tuple(full_shape(p)), "any", False): (p, first) for n, p in named}
    _refuse_expert_parallel(model)
    roles = tensor_roles(model, config.ns_split, config.solve_overrides)
    out = {}
    for n, p in named:
        role = roles[n]
        out[role] = (p, first if role.matrix else rest[0])
        if register and role.matrix:
            register_matrix_view(p, role.view)
    if require_matrix and all(s != first for _, s in out.values()):
        raise ValueError(f"preconditioner={first!r} found no hidden weight matrix (linear map) to act on among the "
                         f"trainable parameters (all are embeddings, heads, norms, biases or other tensors): choose an elementwise "
                         f"preconditioner")
    return out


def _refuse_expert_parallel(model: nn.Module) -> None:
    """Experts sharded across ranks (expert parallelism) hold only some experts' slices per rank: orthogonalising
    them as whole stacks would be wrong, and hf_badm does not gather them."""
    for name, module in model.named_modules():
        if getattr(module, "_is_expert_parallel", False):
            raise ValueError(f"{name} is expert-parallel (experts sharded across ranks): hf_badm's Newton-Schulz needs "
                             "whole expert stacks; run without expert parallelism or with an elementwise preconditioner")


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


class ModelGroupedBADM(BADM):
    """BADM that sorts the Trainer's decay groups by local solve, for ``optimizer_cls_and_kwargs=`` with an
    orthogonalising preconditioner: the Trainer builds the groups, but only the model tells embeddings and heads
    apart from hidden matrices (``solve_of``, made by :func:`badm_optimizer_cls_and_kwargs` from the model)."""

    def __init__(self, params: Any, *, solve_of: dict[int, str], config: BADMConfig, world_size: int,
                 **kwargs: Any) -> None:
        super().__init__(split_by_solve(list(params), solve_of, config), **kwargs)
        prepare_for_ranks(self, world_size, **config.parallel_kwargs())


def badm_optimizer_cls_and_kwargs(args: TrainingArguments, model: nn.Module | None = None,
                                  **badm_kwargs: Any) -> tuple[type[BADM], dict[str, Any]]:
    """``(BADM, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``; the Trainer builds the
    decay groups with ``args.weight_decay`` itself. Keywords are BADMConfig fields (or ``badm_config=``).
    An orthogonalising preconditioner (newton_schulz) needs ``model=``: its tensors are then sorted by local solve
    as in :func:`badm_param_groups` (:class:`ModelGroupedBADM`). Under DeepSpeed ZeRO that also needs
    ``callbacks=[BADMMetricsCallback()]`` on the Trainer, which hands BADM the engine's matrix layouts."""
    config, extra = _split_config(dict(badm_kwargs))
    kwargs = {**config.optimizer_kwargs(args.learning_rate), **extra}
    if not LOCAL_SOLVES[config.preconditioner].orthogonalises:
        return BADM, kwargs
    if model is None:
        raise ValueError(f"badm_optimizer_cls_and_kwargs(args, preconditioner={config.preconditioner!r}) needs model=: "
                         "the Trainer builds the param groups, and only the model tells embeddings and the LM head "
                         "apart from the hidden matrices to orthogonalise")
    solve_of = {id(p): solve for p, solve in _assign_solves(model, config).values()}
    return ModelGroupedBADM, {**kwargs, "solve_of": solve_of, "config": config, "world_size": args.world_size}


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
    refuse_deepspeed(args, "create_badm_optimizer", "Use BADMTrainer(badm_config=BADMConfig(...)) (or the "
                     "BADMTrainerMixin), or Trainer(optimizer_cls_and_kwargs=badm_optimizer_cls_and_kwargs(args, ...)): "
                     "both create BADM where DeepSpeed takes it")
    config, extra = _split_config(dict(badm_kwargs))
    optimizer = build_badm(badm_param_groups(model, args.weight_decay, config=config), config, args, **extra)
    return optimizer, trainer_scheduler(optimizer, args, num_training_steps)


def build_badm(groups: list[dict], config: BADMConfig, args: TrainingArguments, **extra: Any) -> BADM:
    """BADM over ``groups`` with ``config``'s settings (sigma from the Trainer's learning rate where not given), made
    ready for the run's ranks (``prepare_for_ranks``): what ``create_badm_optimizer`` and the mixin's
    ``create_optimizer`` make (``optimizer_cls_and_kwargs=`` hands the Trainer :class:`ModelGroupedBADM`, which does
    the same in its constructor)."""
    optimizer = BADM(groups, **config.optimizer_kwargs(args.learning_rate), **extra)
    prepare_for_ranks(optimizer, args.world_size, **config.parallel_kwargs())
    return optimizer


def refuse_deepspeed(args: TrainingArguments, factory: str, instead: str) -> None:
    """An optimizer made before the Trainer (``optimizers=``) is dropped by the Trainer under DeepSpeed, which then
    trains with its default AdamW at this optimizer's learning rate: refused, saying what to use ``instead``."""
    if getattr(args, "deepspeed_plugin", None) is not None:
        raise ValueError(f"Trainer(optimizers={factory}(...)) cannot run under DeepSpeed: the Trainer discards an "
                         "optimizer passed through optimizers= when it initialises DeepSpeed and trains with its default "
                         f"AdamW instead, at this optimizer's learning rate. {instead}")


def trainer_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments,
                      num_training_steps: int | None = None) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The schedule the Trainer would build for ``optimizer`` (``get_scheduler(args.lr_scheduler_type, ...)`` with the
    args' warmup) over ``num_training_steps`` (default ``args.max_steps``); ``None`` when neither is known: the
    Trainer then builds the same schedule itself once it knows the length of training."""
    steps = num_training_steps if num_training_steps is not None else args.max_steps
    if steps is None or steps <= 0:
        return None
    return get_scheduler(args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.get_warmup_steps(steps),
                         num_training_steps=steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs or {})
