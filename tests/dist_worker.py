"""One rank of a multi-process test: runs jobs in order and writes each job's final parameters.

tests/test_distributed.py launches it with ``accelerate launch`` or ``python -m torch.distributed.run`` as
``dist_worker.py OUT JOBS_JSON``; a job is a dict and writes ``OUT/<name>/rank<r>.pt`` with
``{"params": {name: tensor}, "losses": [...]}``, or ``OUT/<name>/error<r>.txt`` when ``expect_error`` is set
and construction raised. Trainer job keys: name, mode, ga (accumulation), steps, double (float64 model),
pad (unequal sub-batches), save_steps (0: none), resume (checkpoint), deepspeed (config dict), wiring (how BADM
reaches the Trainer, as the README shows it: "badm_trainer" (default), "optimizers" (a plain Trainer with
``optimizers=create_badm_optimizer(...)``), "cls_kwargs" (``optimizer_cls_and_kwargs=``), "mixin" (TRL's
SFTTrainer through BADMTrainerMixin)), noise_seed (gradients perturbed at rounding level: :class:`RoundingNoise`), schedule (lr_scheduler_type, default
constant), penalties (sigma and rho instead of :data:`PENALTIES`).
``{"name": ..., "fsdp2": True, "steps": n}`` runs :func:`fsdp2_run` instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_badm import BADM, BADMConfig, BADMMetricsCallback, BADMTrainer, BADMTrainerMixin, create_badm_optimizer
from hf_badm.factory import badm_optimizer_cls_and_kwargs
from tiny import chain_dataset, losses, tiny_args, tiny_model


# sigma, rho of each local solve in these runs: SGD-scale steps for the paper's BADM and Newton-Schulz, an
# AdamW-scale step (lr 0.01) for normalized, whose RMS-normalised direction would make lr 1/3 chaotic: rounding
# differences between engines would then grow instead of staying at rounding level.
PENALTIES = {"none": {"sigma": 3.0, "rho": 4.5}, "newton_schulz": {"sigma": 3.0, "rho": 4.5},
             "second_moment": {"sigma": 3.0, "rho": 4.5}, "normalized": {"sigma": 100.0, "rho": 900.0},
             "adam": {"sigma": 100.0, "rho": 300.0}}


def trainer_job(out: Path, job: dict) -> Trainer:
    save, wiring = job.get("save_steps", 0), job.get("wiring", "badm_trainer")
    args_cls: type = TrainingArguments
    if wiring == "mixin":
        from trl import SFTConfig as args_cls  # noqa: N813
    args = tiny_args(out / job["name"], args_cls, max_steps=job["steps"], gradient_accumulation_steps=job["ga"],
                     max_grad_norm=0.0, save_strategy="steps" if save else "no", save_steps=save or 500,
                     deepspeed=job.get("deepspeed"), lr_scheduler_type=job.get("schedule", "constant"),
                     **({"max_length": 64, "bf16": False} if wiring == "mixin" else {}))
    model = build_model(job, args)
    model = model.double() if job.get("double") else model
    data = chain_dataset(pad_to_random_length=job.get("pad", False))
    config = BADMConfig(mode=job["mode"], preconditioner=job.get("preconditioner", "none"),
                        **job.get("penalties", PENALTIES[job.get("preconditioner", "none")]))
    if wiring == "optimizers":
        return Trainer(model=model, args=args, train_dataset=data,
                       optimizers=create_badm_optimizer(model, args, badm_config=config))
    if wiring == "cls_kwargs":  # the callback hands BADM an engine's matrix layouts (newton_schulz under ZeRO)
        return Trainer(model=model, args=args, train_dataset=data, callbacks=[BADMMetricsCallback()],
                       optimizer_cls_and_kwargs=badm_optimizer_cls_and_kwargs(args, model=model, badm_config=config))
    if wiring == "mixin":
        from trl import SFTTrainer

        from hf_badm.data import build_tokenizer

        class BADMSFTTrainer(BADMTrainerMixin, SFTTrainer):
            pass

        return BADMSFTTrainer(model=model, args=args, train_dataset=data, processing_class=build_tokenizer(vocab_size=64),
                              badm_config=config)
    return BADMTrainer(model=model, args=args, train_dataset=data, badm_config=config)


def build_model(job: dict, args: TrainingArguments) -> torch.nn.Module:
    """The model as HF scripts build it: before the arguments (``build="before"``, the default), or after them
    through ``from_config`` or ``from_pretrained`` of a saved directory, which under a ZeRO-3 TrainingArguments
    partitions every weight as it is made (``deepspeed.zero.Init``). On CPUs (``use_cpu``) DeepSpeed's communicator
    must exist before that: the two lines docs/distributed.md gives a user's script."""
    from transformers import AutoModelForCausalLM

    family, build = job.get("family", "gpt2"), job.get("build", "before")
    if build == "before":
        return _eager_experts(_start(tiny_model(family), job))
    if args.deepspeed:
        import deepspeed

        _ = args.device  # sets up the process group
        deepspeed.init_distributed(dist_backend="gloo")
    if build == "from_pretrained":
        model = AutoModelForCausalLM.from_pretrained(job["pretrained"])
    else:
        config = tiny_model(family).config
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(config)
    if family == "gpt2":
        model.loss_type = "ForCausalLM"  # as tiny_model: GPT-2 leaves it unset
    return _eager_experts(_start(model, job))


def _start(model: torch.nn.Module, job: dict) -> torch.nn.Module:
    """A reference run starts where the run it is compared with started (``init_from``)."""
    if job.get("init_from"):
        model.load_state_dict(torch.load(job["init_from"], weights_only=True)["init"])
    return model


def records_start(job: dict) -> bool:
    """Whether a run's start must be recorded for its 1-rank reference: a model made after ZeRO-3's arguments is
    initialised partitioned (``deepspeed.zero.Init``), whose random draws need not be the unpartitioned model's."""
    return job.get("build", "before") != "before" or (job.get("deepspeed") or {}).get(
        "zero_optimization", {}).get("stage") == 3


def _eager_experts(model: torch.nn.Module) -> torch.nn.Module:
    """MoE experts through the plain per-expert loop: the grouped matmul kernel takes no float64."""
    if any(p.dim() == 3 for p in model.parameters()):
        model.set_experts_implementation("eager")
    return model


def full_params(trainer: Trainer) -> dict[str, torch.Tensor]:
    params = dict(trainer.model.named_parameters())
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):  # ZeRO-3 holds only a partition
            return {n: p.detach().cpu().clone() for n, p in params.items()}
    return {n: p.detach().cpu().clone() for n, p in params.items()}


class CommMeter:
    """Bytes that collectives materialise inside ``BADM.step`` on this rank: every tensor a collective reads or writes
    there, each storage counted once per step (a buffer reused by a second collective is not new memory). Divided by
    the rank's own fp32 share of the Newton-Schulz tensors it is the ratio docs/distributed.md tabulates."""

    COLLECTIVES = ("all_to_all_single", "all_gather", "all_gather_into_tensor", "all_reduce", "broadcast",
                   "reduce_scatter_tensor", "gather", "scatter", "all_to_all")

    def __init__(self, opt: BADM) -> None:
        self.calls: list[tuple[int, int]] = []  # (bytes, own fp32 NS share) of each BADM.step with an NS share
        self._seen: dict[int, int] | None = None
        for name in self.COLLECTIVES:
            original = getattr(dist, name)
            setattr(dist, name, self._counted(original))
        step = opt.step

        def metered_step(*args, **kwargs):
            share = ns_share_bytes(opt)  # read in the step: ZeRO-3 puts each sub-group's partition in only then
            self._seen = {}
            try:
                return step(*args, **kwargs)
            finally:
                if share:
                    self.calls.append((sum(self._seen.values()), share))
                self._seen = None

        opt.step = metered_step

    def _counted(self, original):
        def collective(*args, **kwargs):
            if self._seen is not None:
                for t in _tensors(list(args) + list(kwargs.values())):
                    storage = t.untyped_storage()
                    self._seen[storage.data_ptr()] = max(self._seen.get(storage.data_ptr(), 0), storage.nbytes())
            return original(*args, **kwargs)

        return collective


def _tensors(values: list) -> list[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += _tensors(list(v))
    return out


def ns_share_bytes(opt: BADM) -> int:
    """This rank's fp32 bytes of the tensors its Newton-Schulz groups step (a partition, a shard or whole matrices)."""
    tensors = [p for g in opt.param_groups if opt.group_orthogonalises(g) for p in g["params"]]
    return 4 * sum((p.to_local() if type(p).__name__ == "DTensor" else p).numel() for p in tensors)


def fsdp2_run(steps: int, rank: int = 0, world: int = 1, preconditioner: str = "none",
              extra: dict | None = None, save: tuple[int, str] | None = None, resume: str | None = None,
              **parallel) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Fused BADM (with weight decay) on a float64 tiny GPT-2, sharded with torch's FSDP2 ``fully_shard`` when
    world > 1 (Accelerate enables FSDP only on GPUs). Each step: 8 sequences split over the ranks; every rank
    computes its mean loss and FSDP's reduce-scatter averages the gradients (equal token counts: the global mean).
    ``newton_schulz``: the groups of create_badm_optimizer, and each sharded matrix orthogonalised whole on one
    rank (``ParallelOrthogonaliser``). ``save=(step, folder)``: a torch distributed checkpoint (DCP) after that step;
    ``resume``: continue from one (saved on any world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    from hf_badm.parallel.dcp import badm_state_dict, load_badm_state_dict

    from hf_badm.parallel import prepare_for_ranks
    from hf_badm.factory import badm_param_groups

    model = tiny_model("gpt2").double()
    if world > 1:
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    config = BADMConfig(preconditioner=preconditioner, **PENALTIES[preconditioner])
    opt = BADM(badm_param_groups(model, 0.01, config=config), **config.optimizer_kwargs(0.3))
    prepare_for_ranks(opt, world, **{**config.parallel_kwargs(), **parallel})
    meter = CommMeter(opt) if extra is not None else None
    ids = torch.tensor(chain_dataset()["input_ids"])
    per_rank = 8 // world
    trace, first = [], 0
    if resume is not None:
        state = {**badm_state_dict(model, opt), "step": 0}
        dcp.load(state, checkpoint_id=resume)
        load_badm_state_dict(model, opt, state)
        first = state["step"]
    for step in range(first, steps):
        mine = ids[step * 8 + rank * per_rank: step * 8 + (rank + 1) * per_rank]
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        trace.append(loss.item())
        if save is not None and step + 1 == save[0]:
            dcp.save({**badm_state_dict(model, opt), "step": step + 1}, checkpoint_id=save[1])
    full = {n: (p.full_tensor() if world > 1 else p).detach().clone() for n, p in model.named_parameters()}
    if meter is not None:
        extra["comm"] = meter.calls
    return full, trace


def reset_deepspeed_state() -> None:
    """A DeepSpeed TrainingArguments leaves process-wide state; the next job must start clean."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(True)


class NewtonSchulzFlops(TrainerCallback):
    """Matmul FLOPs of this rank's Newton-Schulz work per optimizer step (torch's FLOP counter around every call of
    ``BADM.orthogonaliser``: in the step in fused mode, in the absorbs in per-sub-batch mode)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.flops, self._running = trainer, [], 0

    def on_train_begin(self, args, state, control, **kwargs):
        from hf_badm.trainer import find_badm

        opt = find_badm(self.trainer.optimizer)
        inner = opt.orthogonaliser

        def counted(params, inputs, steps, dtype):
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as mode:
                out = inner(params, inputs, steps, dtype)
            self._running += mode.get_total_flops()
            return out

        opt.orthogonaliser = counted

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.flops.append(self._running)
        self._running = 0


class RoundingNoise(TrainerCallback):
    """Each gradient perturbed at its dtype's rounding level before every optimizer step (a random relative change of
    at most one unit in the last place per element, seeded): what reordering a reduction does to a sum. The 1-rank run with it
    against the same run without it is the noise floor a multi-rank comparison is judged by (tests/test_distributed.py
    ``noise_floor``), on whatever CPU and float kernels run the tests."""

    def __init__(self, trainer: Trainer, seed: int) -> None:
        self.trainer, self.generator = trainer, torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for p in self.trainer.model.parameters():
            if p.grad is not None:
                u = torch.rand(p.grad.shape, generator=self.generator, dtype=torch.float64).mul_(2).sub_(1)
                p.grad.add_(p.grad * u.to(p.grad.dtype) * torch.finfo(p.grad.dtype).eps)


class MeterOnTrainBegin(TrainerCallback):
    """A :class:`CommMeter` around the BADM a Trainer steps, once the engine has partitioned it."""

    def __init__(self, trainer: Trainer, extra: dict) -> None:
        self.trainer, self.extra = trainer, extra

    def on_train_begin(self, args, state, control, **kwargs):
        from hf_badm.trainer import find_badm

        self.meter = CommMeter(find_badm(self.trainer.optimizer))

    def on_train_end(self, args, state, control, **kwargs):
        self.extra["comm"] = self.meter.calls


def expected_error(out: Path, job: dict, rank: int, err: ValueError) -> None:
    """Record the start-up error a job with ``expect_error`` expects (any other job re-raises it)."""
    if not job.get("expect_error"):
        raise err
    (out / job["name"] / f"error{rank}.txt").write_text(str(err))
    reset_deepspeed_state()


def run_job(out: Path, job: dict) -> None:
    rank = int(os.environ.get("RANK", "0"))
    extra: dict = {}
    (out / job["name"]).mkdir(parents=True, exist_ok=True)
    if rank == 0:  # what ran, for the test that derives its 1-rank reference from it
        (out / job["name"] / "job.json").write_text(json.dumps(job))
    if job.get("fsdp2"):
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        params, trace = fsdp2_run(job["steps"], rank, dist.get_world_size(), job.get("preconditioner", "none"),
                                  extra if job.get("meter") else None, job.get("save"), job.get("resume"),
                                  **job.get("parallel", {}))
    else:
        try:
            trainer = trainer_job(out, job)
        except ValueError as err:
            expected_error(out, job, rank, err)
            return
        from hf_badm.factory import solve_report

        report = solve_report(trainer.model, trainer.badm_config if hasattr(trainer, "badm_config") else BADMConfig(
            preconditioner=job.get("preconditioner", "none")))
        extra["report"] = {"tensors": report.tensors, "left": list(report.elementwise_matrices)}
        if records_start(job):  # the start both runs of a comparison must share
            extra["init"] = full_params(trainer)
        counter = NewtonSchulzFlops(trainer) if job.get("preconditioner") == "newton_schulz" else None
        if counter is not None:
            trainer.add_callback(counter)
        if job.get("meter"):
            trainer.add_callback(MeterOnTrainBegin(trainer, extra))
        if job.get("noise_seed") is not None:
            trainer.add_callback(RoundingNoise(trainer, job["noise_seed"]))
        try:
            trainer.train(resume_from_checkpoint=job.get("resume"))
        except ValueError as err:  # a checkpoint refused at start-up
            expected_error(out, job, rank, err)
            return
        params, trace = full_params(trainer), losses(trainer)
        if counter is not None:
            extra["ns_flops"] = counter.flops
        if job.get("deepspeed"):
            reset_deepspeed_state()
    torch.save({"params": params, "losses": trace, **extra}, out / job["name"] / f"rank{rank}.pt")


def main() -> None:
    out, jobs = Path(sys.argv[1]), json.loads(sys.argv[2])
    for job in jobs:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"== job {job['name']}", flush=True)  # where a failed launch stopped
        run_job(out, job)
    if dist.is_initialized():  # no rank drops its communicator while another still talks to it (gloo aborts)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
