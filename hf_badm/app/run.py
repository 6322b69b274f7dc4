"""One training job of a recipe: model, data, Trainer (BADM or a comparison optimizer), metrics and plot.

The arguments are dataclasses (``hf_badm.app.arguments``), so a recipe is YAML for ``HfArgumentParser``
and every field can be overridden on the command line; ``hf_badm.app.recipe`` does the parsing.
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import signal
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, Trainer,
                          TrainingArguments, default_data_collator)
from transformers.trainer_utils import enable_full_determinism, set_seed

from hf_badm.app import RecipeError, RunEnded, data
from hf_badm.app.arguments import SFT_TASKS, SIZES, ModelArguments, TaskArguments
from hf_badm.app.callbacks import AtMaxSteps, Clock, NothingToTrain, RunTotals, StopOnSignal, Stopped, StopWhenStuck
from hf_badm.app.checkpoint import (STAGING, CheckpointMixin, discarded_on_failure, incomplete, latest_checkpoint,
                                     publish, verify_checkpoint)
from hf_badm.app.checks import check_sources, check_values
from hf_badm.app.faults import fault
from hf_badm.app.launch import announce_deepspeed_build, quiet_run, warn_single_process
from hf_badm.app.output import OutputDirLock, check_output_dir, clear_replaced_run, clear_staging, newest_checkpoint
from hf_badm.app.plots import PLOT_SKIPPED, plot_runs
from hf_badm.config import BADMConfig
from hf_badm.factory import solve_report
from hf_badm.optim.local_solve import LOCAL_SOLVES
from hf_badm.peers import PEERS, create_peer_optimizer
from hf_badm.trainer import BADMTrainerMixin, LossItemsMixin


def load_tokenizer(model_args: ModelArguments) -> tuple[PreTrainedTokenizerBase, bool]:
    """The named (or the model's) tokenizer, else one trained here; True when trained here (the run saves it)."""
    from hf_badm.app.data import build_tokenizer

    source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    if source:
        try:
            return AutoTokenizer.from_pretrained(source), False
        except (OSError, ValueError) as err:
            if model_args.tokenizer_name_or_path:
                raise RecipeError(f"tokenizer_name_or_path: cannot load {source}: {_first_line(err)}") from None
    return build_tokenizer(vocab_size=model_args.vocab_size), True


def build_model(model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    if model_args.model_name_or_path:
        try:
            return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
        except (OSError, ValueError) as err:  # a directory without a model, a hub id without access
            raise RecipeError(f"model_name_or_path: cannot load {model_args.model_name_or_path}: "
                              f"{_first_line(err)}") from None
    s = SIZES[model_args.model_size]
    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    if model_args.model_family == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
                                      n_positions=1024, **common)
    else:
        extra: dict[str, Any] = dict(hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                                     num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                                     intermediate_size=4 * s["hidden"], max_position_embeddings=1024)
        if model_args.model_family == "mixtral":
            extra.update(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True)
        if model_args.model_family == "qwen2_moe":
            extra.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=2 * s["hidden"],
                         shared_expert_intermediate_size=2 * s["hidden"], output_router_logits=True)
        config = AutoConfig.for_model(model_args.model_family, **extra, **common)
    return AutoModelForCausalLM.from_config(config)


def _trainer_class(task: str, optimizer: str) -> type[Trainer]:
    """BADM's Trainer, or the same Trainer counting loss items as BADM's does (``LossItemsMixin``): every
    optimizer's losses are then the same mean and compare. The CLI's ``CheckpointMixin`` comes first."""
    if task in SFT_TASKS:
        from trl import SFTTrainer

        base: type[Trainer] = SFTTrainer
    else:
        base = Trainer
    mixin = BADMTrainerMixin if optimizer == "badm" else LossItemsMixin
    return type(f"CLI{'BADM' if optimizer == 'badm' else 'MeanLoss'}{base.__name__}", (CheckpointMixin, mixin, base), {})


def run(model_args: ModelArguments, task_args: TaskArguments, badm: BADMConfig, args: TrainingArguments) -> dict[str, Any]:
    """Train one recipe; write ``metrics.json``, ``loss.png`` and the model into ``args.output_dir``.

    Everything that can be checked is checked before the first write: values, sources, the output_dir,
    the checkpoint to resume from, the data itself (loaded and tokenized in memory) and the Trainer's own
    start-up checks. The first write takes the output_dir's lock (rank 0). A SIGTERM or SIGINT at any moment
    keeps everything complete so far and ends with one line saying what output_dir holds."""
    stop = StopOnSignal()
    with stop:
        try:
            return _run(stop, model_args, task_args, badm, args)
        except Stopped:
            raise _stopped(stop, Path(args.output_dir)) from None


def _run(stop: StopOnSignal, model_args: ModelArguments, task_args: TaskArguments, badm: BADMConfig,
         args: TrainingArguments) -> dict[str, Any]:
    resume = _start(model_args, task_args, badm, args)
    model, tokenizer, trained_here, ds, kwargs = _model_and_data(model_args, task_args, args)
    quiet_run(args)
    fingerprint = weights_fingerprint(model)
    if task_args.optimizer == "badm":
        kwargs["badm_config"] = badm
        if args.process_index == 0:
            report = _start_up(solve_report, model, badm)  # what went where: matrices, experts, embeddings
            print(report, flush=True)
            if task_args.solve_report:
                _write_solve_report(Path(task_args.solve_report), report.listing())
    elif task_args.optimizer in PEERS:
        options = {name: getattr(task_args, name) for name in PEERS[task_args.optimizer].options}
        kwargs["optimizers"] = _start_up(create_peer_optimizer, task_args.optimizer, model, args, options,
                                         solve_overrides=badm.solve_overrides, adamw_lr=task_args.muon_adamw_lr)
    out = Path(args.output_dir)
    lock = OutputDirLock(out) if args.process_index == 0 else nullcontext()
    totals, stuck, trainer = RunTotals(), StopWhenStuck(task_args.max_skipped_steps), None
    with lock:
        try:
            if args.process_index == 0:
                resume = check_output_dir(args, task_args)  # again under the lock: another run may have finished here
                clear_staging(out)
            trainer = _start_up(_trainer_class(task_args.task, task_args.optimizer), model=model, args=args,
                                train_dataset=ds["train"], eval_dataset=ds["test"], processing_class=tokenizer,
                                callbacks=[Clock(), stop, stuck, totals, AtMaxSteps()], **kwargs)
            if resume is None and task_args.overwrite_output_dir and trainer.is_world_process_zero():
                clear_replaced_run(out)
            if resume is not None and not totals.restore(Path(resume)):
                print(f"hf-badm: warning: {resume} has no {RunTotals.FILE}: train_loss and tokens_per_second will "
                      "cover the resumed steps only", file=sys.stderr, flush=True)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            fault("start")
            result = _train(trainer, resume)
            if stop.received is not None and args.world_size == 1:
                raise Stopped(stop.received)  # the first signal, deferred to the step's end
            stop.phase = "final"
            if ended := stuck.ended():
                raise ended
            metrics = _metrics(trainer, result, totals, model_args, task_args, badm, args, ds, tokenizer)
            metrics["init_fingerprint"] = fingerprint
            _write_final(trainer, out, metrics, tokenizer if trained_here else None)
            stop.quiet = True
        except Stopped:
            _save_last_state(stop, trainer, out)
            raise
    if stop.received is not None:  # several ranks: the stop came while the final files were written
        print(f"hf-badm: note: {signal.Signals(stop.received).name} arrived while the final files were written; "
              "the run finished first", file=sys.stderr, flush=True)
    return metrics


def _train(trainer: Trainer, resume: str | None) -> Any:
    """``trainer.train``; a run resumed at its max_steps trains nothing (the state is loaded, then it ends: None)."""
    try:
        return trainer.train(resume_from_checkpoint=resume)
    except NothingToTrain:
        return None


def _save_last_state(stop: StopOnSignal, trainer: Trainer | None, out: Path) -> None:
    """A stop once training has begun: the state training is in is kept as a checkpoint (unless there is one at
    that step: the Trainer saves one at a stop while training), from which the printed command goes on, or
    writes the final files after the last step. Not after a second signal, which also ends this save at once;
    its staging is then removed and the earlier checkpoints stay."""
    if (stop.phase == "setup" or stop.signals > 1 or trainer is None
            or (out / f"checkpoint-{trainer.state.global_step}").is_dir()):
        return
    stop.quiet = False
    try:
        trainer.save_last_state()
    except Stopped:
        pass
    finally:
        stop.quiet = True


def _stopped(stop: StopOnSignal, out: Path) -> RunEnded:
    """One line: what stopped the run, where, what output_dir holds (the CLI adds the command to continue)."""
    stop.quiet = True
    name, step = signal.Signals(stop.received).name, stop.step
    when = {"setup": "before the first step", "training": f"at step {step}",
            "final": f"after the last step ({step}), before the final files were written"}[stop.phase]
    found = latest_checkpoint(out) if out.is_dir() else None
    count = sum(1 for d in out.glob("checkpoint-*") if d.is_dir()) if out.is_dir() else 0
    held = (f"{out} holds {count} checkpoint(s), the last complete one {found}" if found
            else f"no checkpoint saved in {out}")
    return RunEnded(f"stopped by {name} {when}: {held}", 128 + stop.received, resume=found is not None)


def _write_final(trainer: Trainer, out: Path, metrics: dict[str, Any], tokenizer: PreTrainedTokenizerBase | None) -> None:
    """Model, tokenizer, metrics.json and plot are written into a staging folder, then moved into place with
    metrics.json (the mark of a finished run) last: a stop or a full disk leaves no half-written final file."""
    staged, zero = out / STAGING / "final", trainer.is_world_process_zero()
    if zero:
        shutil.rmtree(staged, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    with discarded_on_failure(staged, out, "the final model and metrics", zero):
        trainer.save_model(str(staged))  # on every rank: under ZeRO-3 it gathers the weights
        fault("final_save")
        if zero:
            if tokenizer is not None:
                tokenizer.save_pretrained(str(staged / "tokenizer"))
            (staged / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
            if plot_runs({metrics["optimizer"]: metrics}, staged / "loss.png") is None:
                print(PLOT_SKIPPED)
            for path in sorted(staged.iterdir(), key=lambda p: p.name == "metrics.json"):
                publish(path, out / path.name)
            staged.rmdir()


def run_label(task_args: TaskArguments, badm: BADMConfig) -> str:
    """What ran, as `hf-badm compare` names it: badm (the paper's), badm-<preconditioner>, or the optimizer."""
    if task_args.optimizer == "badm" and not LOCAL_SOLVES[badm.preconditioner].plain:
        return f"badm-{badm.preconditioner}"
    return task_args.optimizer


def _metrics(trainer: Trainer, result: Any, totals: RunTotals, model_args: ModelArguments, task_args: TaskArguments,
             badm: BADMConfig, args: TrainingArguments, ds: Any, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The whole run's figures, a resumed run's included: train_loss over all steps, tokens per second over the
    steps' own seconds (train_steps_seconds); train_runtime is this process's ``train`` call (0 when a resume had
    nothing left to train)."""
    metrics: dict[str, Any] = {"optimizer": run_label(task_args, badm), "task": task_args.task,
                               **totals.summary(trainer.state.num_input_tokens_seen), **final_evaluation(trainer)}
    metrics["train_runtime"] = result.metrics["train_runtime"] if result is not None else 0.0
    metrics["peak_memory_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
                                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if task_args.task in SFT_TASKS and task_args.exact_match_examples > 0:
        held_out = ds["test"].select(range(min(task_args.exact_match_examples, len(ds["test"]))))
        metrics["exact_match"] = data.evaluate_exact_match(trainer.model, tokenizer, held_out)
    metrics["log_history"] = trainer.state.log_history
    metrics["recipe"] = {"model": asdict(model_args), "task": asdict(task_args), "badm": asdict(badm),
                         "learning_rate": args.learning_rate, "max_steps": args.max_steps}
    return metrics


def _start(model_args: ModelArguments, task_args: TaskArguments, badm: BADMConfig, args: TrainingArguments) -> str | None:
    """The checks that need no data, then the process group (with its launch notes); returns the checkpoint to
    resume from."""
    check_values(model_args, task_args, badm, args)
    resume = check_output_dir(args, task_args)
    check_sources(model_args, task_args)
    if resume is not None:
        newest = newest_checkpoint(Path(args.output_dir))
        if args.process_index == 0 and newest is not None and newest != Path(resume) and incomplete(newest):
            print(f"hf-badm: note: {incomplete(newest)}: resuming from {resume}, the last complete checkpoint",
                  file=sys.stderr, flush=True)
        verify_checkpoint(resume, args, task_args.allow_partial_resume)
    if args.deepspeed:
        announce_deepspeed_build()  # before the process group: DeepSpeed builds its extension there
    _ = args.device  # set up the process group before the model: ZeRO-3 builds it partitioned (zero.Init)
    warn_single_process(args.world_size)
    if args.deepspeed and torch.distributed.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    if task_args.optimizer != "badm" and task_args.optimizer not in PEERS:
        args.optim = task_args.optimizer
    return resume


def _model_and_data(model_args: ModelArguments, task_args: TaskArguments, args: TrainingArguments):
    """(model, tokenizer, tokenizer trained here, {"train", "test"} dataset, Trainer kwargs), all in memory.

    The model is the first thing drawn from the seeded RNG: one recipe and seed give one set of initial
    weights, and every optimizer of `hf-badm compare` starts from them."""
    raw = _load_data(task_args, args.seed)
    tokenizer, trained_here = load_tokenizer(model_args)
    enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
    model = build_model(model_args, tokenizer)
    kwargs: dict[str, Any] = {}
    if task_args.task in SFT_TASKS:
        ds = raw.select_columns(["prompt", "completion"])
        if task_args.task == "lora-sft":
            from peft import LoraConfig, get_peft_model

            targets = _lora_targets(model_args.lora_target_modules)
            model = get_peft_model(model, LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                                                     target_modules=targets, task_type="CAUSAL_LM"))
    else:
        try:
            ds = data.tokenize_for_causal_lm(raw, tokenizer, task_args.block_size, text_column="text")
        except ValueError as err:
            raise RecipeError(f"dataset {task_args.dataset}: {_first_line(err)}") from None
        kwargs.update(data_collator=default_data_collator)
    return model, tokenizer, trained_here, ds, kwargs


def _load_data(task_args: TaskArguments, seed: int):
    """The recipe's data as ``{"train", "test"}``, loaded before anything is written; failures name the source."""
    sizes = dict(seed=seed, num_train=task_args.num_train_examples, num_eval=task_args.num_eval_examples,
                 config_name=task_args.dataset_config)
    try:
        if task_args.task in SFT_TASKS:
            tasks = task_args.instruction_tasks.split(",") if task_args.instruction_tasks else None
            return data.load_instruction_dataset(task_args.dataset, tasks=tasks, **sizes)
        return data.load_text_dataset(task_args.dataset, text_column=task_args.text_column, **sizes)
    except ValueError as err:  # ours name the source; datasets' may not
        message = _first_line(err)
        raise RecipeError(f"dataset: {message}" if task_args.dataset in message
                          else f"dataset {task_args.dataset}: {message}") from None
    except Exception as err:  # noqa: BLE001 (datasets' loaders fail with many types, StopIteration included)
        raise RecipeError(f"dataset: cannot read {task_args.dataset} ({type(err).__name__}: "
                          f"{_first_line(err) or 'no rows'})") from None


def _write_solve_report(path: Path, listing: str) -> None:
    """``--solve_report FILE``: every trainable tensor's name, shape, role, solve and parts, tab-separated."""
    try:
        path.write_text(listing)
    except OSError as err:
        raise RecipeError(f"solve_report: cannot write {path}: {err.strerror}") from None


def _start_up(build: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Build the optimizer or Trainer; their start-up refusals (ValueError) are the recipe's errors."""
    try:
        return build(*args, **kwargs)
    except ValueError as err:
        raise RecipeError(_first_line(err)) from None


def final_evaluation(trainer: Trainer) -> dict[str, Any]:
    """The evaluation at the last step: the one the Trainer logged there if any (eval_steps dividing max_steps),
    else a new one."""
    step = trainer.state.global_step
    logged = [h for h in trainer.state.log_history if h.get("step") == step and "eval_loss" in h]
    if logged:
        return {k: v for k, v in logged[-1].items() if k.startswith("eval_") or k == "epoch"}
    return trainer.evaluate()


def weights_fingerprint(model: torch.nn.Module) -> str | None:
    """A short hash of the trainable weights (up to 4096 evenly spaced values of each tensor): equal for runs
    that start from the same weights, different otherwise; cheap for any model size. None where this process
    holds no weights (ZeRO-3 partitions them at construction)."""
    digest, hashed = hashlib.sha256(), False
    for name, p in model.named_parameters():
        if p.requires_grad and p.numel():
            flat = p.detach().reshape(-1)
            digest.update(name.encode() + flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
            hashed = True
    return digest.hexdigest()[:16] if hashed else None


def _first_line(err: BaseException) -> str:
    return next((line for line in str(err).splitlines() if line.strip()), "")


def _lora_targets(spec: str) -> str | list[str]:
    return spec if spec == "all-linear" else [m.strip() for m in spec.split(",") if m.strip()]
