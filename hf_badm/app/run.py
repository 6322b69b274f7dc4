"""One training job of a recipe: model, data, Trainer (BADM or a comparison optimizer), metrics and plot.

The arguments are dataclasses (``hf_badm.app.arguments``), so a recipe is YAML for ``HfArgumentParser``
and every field can be overridden on the command line; ``hf_badm.app.recipe`` does the parsing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import pickle
import resource
import shutil
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
from hf_badm.app.callbacks import Clock, StopOnSignal, StopWhenStuck
from hf_badm.app.checkpoint import verify_checkpoint
from hf_badm.app.checks import PEERS, check_sources, check_values
from hf_badm.app.launch import announce_deepspeed_build, quiet_run, warn_single_process
from hf_badm.app.output import OutputDirLock, check_output_dir, latest_checkpoint
from hf_badm.app.plots import PLOT_SKIPPED, plot_runs
from hf_badm.config import BADMConfig
from hf_badm.factory import solve_report
from hf_badm.optim.local_solve import LOCAL_SOLVES
from hf_badm.trainer import BADMTrainer, BADMTrainerMixin, LossItemsMixin


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
    optimizer's losses are then the same mean and compare."""
    if task in SFT_TASKS:
        from trl import SFTTrainer

        base: type[Trainer] = SFTTrainer
    else:
        base = Trainer
    if optimizer == "badm":
        return BADMTrainer if base is Trainer else type(f"BADM{base.__name__}", (BADMTrainerMixin, base), {})
    return type(f"MeanLoss{base.__name__}", (LossItemsMixin, base), {})


def run(model_args: ModelArguments, task_args: TaskArguments, badm: BADMConfig, args: TrainingArguments) -> dict[str, Any]:
    """Train one recipe; write ``metrics.json``, ``loss.png`` and the model into ``args.output_dir``.

    Everything that can be checked is checked before the first write: values, sources, the output_dir,
    the checkpoint to resume from, the data itself (loaded and tokenized in memory) and the Trainer's own
    start-up checks. The first write takes the output_dir's lock (rank 0)."""
    resume = _start(model_args, task_args, badm, args)
    model, tokenizer, trained_here, ds, kwargs = _model_and_data(model_args, task_args, args)
    quiet_run(args)
    fingerprint = weights_fingerprint(model)
    if task_args.optimizer == "badm":
        kwargs["badm_config"] = badm
        if args.process_index == 0:
            print(solve_report(model, badm), flush=True)  # what went where: matrices, experts, embeddings
    elif task_args.optimizer in PEERS:
        from hf_badm import peers

        create = getattr(peers, f"create_{task_args.optimizer}_optimizer")
        nu = {"nu": task_args.qhadam_nu} if task_args.optimizer == "muon_qhadam" and task_args.qhadam_nu is not None else {}
        kwargs["optimizers"] = _start_up(create, model, args, adamw_lr=task_args.muon_adamw_lr, **nu)
    out = Path(args.output_dir)
    lock = OutputDirLock(out) if args.process_index == 0 else nullcontext()
    stop, stuck = StopOnSignal(), StopWhenStuck(task_args.max_skipped_steps)
    with lock, stop:
        if args.process_index == 0:
            resume = check_output_dir(args, task_args)  # again under the lock: another run may have finished here
        trainer = _start_up(_trainer_class(task_args.task, task_args.optimizer), model=model, args=args,
                            train_dataset=ds["train"], eval_dataset=ds["test"], processing_class=tokenizer,
                            callbacks=[Clock(), stop, stuck], **kwargs)
        if resume is not None:
            refuse_unfit_checkpoint(trainer, resume)
        elif task_args.overwrite_output_dir and trainer.is_world_process_zero():
            for stale in out.glob("checkpoint-*"):  # the replaced run's: a later resume must not continue it
                shutil.rmtree(stale)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        result = _train(trainer, resume)
        if ended := stuck.ended() or stop.ended(str(out), trainer.state.global_step):
            raise ended
        metrics = _metrics(trainer, result, model_args, task_args, badm, args, ds, tokenizer)
        metrics["init_fingerprint"] = fingerprint
        _save(lambda: trainer.save_model(str(out)), out)  # on every rank: under ZeRO-3 it gathers the weights
        if trainer.is_world_process_zero():
            if trained_here:
                _save(lambda: tokenizer.save_pretrained(str(out / "tokenizer")), out)
            _save(lambda: (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str)), out)
            if plot_runs({metrics["optimizer"]: metrics}, out / "loss.png") is None:
                print(PLOT_SKIPPED)
    return metrics


def run_label(task_args: TaskArguments, badm: BADMConfig) -> str:
    """What ran, as `hf-badm compare` names it: badm (the paper's), badm-<preconditioner>, or the optimizer."""
    if task_args.optimizer == "badm" and not LOCAL_SOLVES[badm.preconditioner].plain:
        return f"badm-{badm.preconditioner}"
    return task_args.optimizer


def _metrics(trainer: Trainer, result: Any, model_args: ModelArguments, task_args: TaskArguments, badm: BADMConfig,
             args: TrainingArguments, ds: Any, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    metrics: dict[str, Any] = {"optimizer": run_label(task_args, badm), "task": task_args.task,
                               "train_loss": result.training_loss, **final_evaluation(trainer)}
    metrics["train_runtime"] = result.metrics["train_runtime"]
    tokens = trainer.state.num_input_tokens_seen
    metrics["tokens_per_second"] = tokens / result.metrics["train_runtime"] if tokens else None
    metrics["peak_memory_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
                                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if task_args.task in SFT_TASKS and task_args.exact_match_examples > 0:
        held_out = ds["test"].select(range(min(task_args.exact_match_examples, len(ds["test"]))))
        metrics["exact_match"] = data.evaluate_exact_match(trainer.model, tokenizer, held_out)
    metrics["log_history"] = trainer.state.log_history
    metrics["recipe"] = {"model": asdict(model_args), "task": asdict(task_args), "badm": asdict(badm),
                         "learning_rate": args.learning_rate, "max_steps": args.max_steps}
    return metrics


def _train(trainer: Trainer, resume: str | None) -> Any:
    """``trainer.train``, with a full disk while saving a checkpoint said in one line."""
    try:
        return trainer.train(resume_from_checkpoint=resume)
    except (OSError, RuntimeError) as err:
        raise _disk_full(err, Path(trainer.args.output_dir)) or err


def _save(write: Callable[[], Any], out: Path) -> None:
    try:
        write()
    except (OSError, RuntimeError) as err:
        raise _disk_full(err, out) or err


def _disk_full(err: BaseException, out: Path) -> RunEnded | None:
    """One line for a write that failed on a full disk (torch's zip writer says only "unexpected pos"), naming
    the file being written (the newest one under ``out``); None for any other error."""
    text = str(err)
    if getattr(err, "errno", None) not in (errno.ENOSPC, errno.EDQUOT) and not any(
            m in text for m in ("No space left", "unexpected pos", "PytorchStreamWriter failed")):
        return None
    files = [p for p in out.rglob("*") if p.is_file()] if out.is_dir() else []
    newest = max(files, key=lambda p: p.stat().st_mtime, default=out)
    found = latest_checkpoint(out) if out.is_dir() else None
    return RunEnded(f"no space left on device while writing {newest}; free some space, then continue with "
                    f"--resume_from_checkpoint ({f'last complete checkpoint: {found}' if found else 'no complete checkpoint yet'})", 1)


def refuse_unfit_checkpoint(trainer: Trainer, checkpoint: str) -> None:
    """A checkpoint from another model size, preconditioner or mode fails inside the Trainer's loaders with a
    clear reason under a long traceback: keep the reason, as the run's one-line refusal (nothing is written
    before the loads)."""
    for name in ("_load_from_checkpoint", "_load_optimizer_and_scheduler", "_load_rng_state"):
        load = getattr(trainer, name, None)
        if load is None:
            continue

        def guarded(*a: Any, _load: Callable[..., Any] = load, **k: Any) -> Any:
            try:
                return _load(*a, **k)
            except (ValueError, RuntimeError, KeyError, OSError, EOFError, pickle.UnpicklingError) as err:
                raise RecipeError(f"resume_from_checkpoint: {checkpoint} does not fit this run: {_reason(err)}") from None

        setattr(trainer, name, guarded)


def _start(model_args: ModelArguments, task_args: TaskArguments, badm: BADMConfig, args: TrainingArguments) -> str | None:
    """The checks that need no data, then the process group (with its launch notes); returns the checkpoint to
    resume from."""
    check_values(model_args, task_args, badm, args)
    resume = check_output_dir(args, task_args)
    check_sources(model_args, task_args)
    if resume is not None:
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


def _reason(err: BaseException) -> str:
    """The first line, with the next one when the first only introduces it ("Error(s) in loading state_dict:")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return lines[0] if lines else type(err).__name__


def _lora_targets(spec: str) -> str | list[str]:
    return spec if spec == "all-linear" else [m.strip() for m in spec.split(",") if m.strip()]
