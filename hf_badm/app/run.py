"""One training job of a recipe: model, data, Trainer (BADM or a comparison optimizer), metrics and plot.

The arguments are dataclasses, so a recipe is YAML for ``HfArgumentParser`` and every field can be
overridden on the command line; ``hf_badm.app.cli`` does the parsing.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, Trainer,
                          TrainerCallback, TrainingArguments, default_data_collator)

from hf_badm.app import RecipeError
from hf_badm.config import BADMConfig
from hf_badm.trainer import BADMTrainer, BADMTrainerMixin

FAMILIES = ("gpt2", "llama", "mixtral", "qwen2_moe")
SIZES = {"tiny": dict(hidden=64, layers=2, heads=4), "small": dict(hidden=128, layers=4, heads=4)}
TASKS = ("pretrain", "finetune", "sft", "lora-sft")
SFT_TASKS = ("sft", "lora-sft")


@dataclass
class ModelArguments:
    """Which model: a config family and size (trained from scratch), or a saved/hub model."""

    model_family: str = field(default="gpt2", metadata={"help": "Model built from a config.", "choices": list(FAMILIES)})
    model_size: str = field(default="tiny", metadata={"help": "Config size (tiny: 2x64, small: 4x128).",
                                                       "choices": list(SIZES)})
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Local directory or hub id loaded with from_pretrained (overrides the family)."})
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer to load; default: the model's, else one trained on the built-in data."})
    vocab_size: int = field(default=1024, metadata={"help": "Vocabulary of a tokenizer trained here."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (task lora-sft)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (task lora-sft)."})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "LoRA target modules, comma-separated or 'all-linear'."})


@dataclass
class TaskArguments:
    """What to train on, and with which optimizer."""

    task: str = field(default="pretrain", metadata={"help": "pretrain | finetune | sft | lora-sft.", "choices": list(TASKS)})
    dataset: str = field(default="builtin", metadata={
        "help": "'builtin' (generated corpus / instruction tasks), local .txt/.jsonl/.json/.parquet/.csv file or "
                "directory (datasets save_to_disk), or a hub dataset name."})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Hub dataset configuration name."})
    text_column: str = field(default="text", metadata={"help": "Text column (pretrain / finetune)."})
    num_train_examples: int = field(default=4000, metadata={"help": "Built-in data: training documents or prompts."})
    num_eval_examples: int = field(default=200, metadata={"help": "Built-in data: held-out documents or prompts."})
    instruction_tasks: Optional[str] = field(default=None, metadata={
        "help": "Built-in instruction tasks, comma-separated (add,sub,mul,copy,reverse,lookup,sort); default all."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    optimizer: str = field(default="badm", metadata={
        "help": "'badm', or any Trainer optim name for comparison (adamw_torch, sgd, adafactor, lion_32bit, ...)."})
    exact_match_examples: int = field(default=64, metadata={"help": "Held-out prompts scored by exact match (sft tasks)."})


def check_inputs(model_args: ModelArguments, task_args: TaskArguments) -> None:
    """Missing files and impossible combinations end the run before any training, with a short message."""
    for name in ("model_name_or_path", "tokenizer_name_or_path"):
        value = getattr(model_args, name)
        if value and value.startswith((".", "/", "~")) and not Path(value).expanduser().exists():
            raise RecipeError(f"{name}: directory not found: {value}")
    spec = task_args.dataset
    if spec != "builtin" and (spec.startswith((".", "/", "~")) or Path(spec).suffix) and not Path(spec).expanduser().exists():
        raise RecipeError(f"dataset: file or directory not found: {spec}")
    if task_args.task == "lora-sft" and not model_args.model_name_or_path:
        raise RecipeError("task lora-sft adapts a trained model: set model_name_or_path (e.g. the pretrain recipe's output_dir)")
    if task_args.task == "finetune" and not model_args.model_name_or_path:
        raise RecipeError("task finetune starts from a trained model: set model_name_or_path")


def load_tokenizer(model_args: ModelArguments, out_dir: Path) -> PreTrainedTokenizerBase:
    from hf_badm.app.data import build_tokenizer

    source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    if source:
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError):
            if model_args.tokenizer_name_or_path:
                raise
    return build_tokenizer(vocab_size=model_args.vocab_size, save_dir=out_dir / "tokenizer")


def build_model(model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    if model_args.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
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


class _Clock(TrainerCallback):
    """Wall-clock seconds since training began, stamped on every log entry (for loss-vs-time plots)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and state.log_history:
            state.log_history[-1]["wall_time"] = time.perf_counter() - self.start


def _trainer_class(task: str, optimizer: str) -> type[Trainer]:
    if task in SFT_TASKS:
        from trl import SFTTrainer

        return type("BADMSFTTrainer", (BADMTrainerMixin, SFTTrainer), {}) if optimizer == "badm" else SFTTrainer
    return BADMTrainer if optimizer == "badm" else Trainer


def run(model_args: ModelArguments, task_args: TaskArguments, badm: BADMConfig, args: TrainingArguments) -> dict[str, Any]:
    """Train one recipe; write ``metrics.json``, ``loss.png`` and the model into ``args.output_dir``."""
    from hf_badm.app import data

    check_inputs(model_args, task_args)
    _ = args.device  # set up the process group before the model: ZeRO-3 builds it partitioned (zero.Init)
    if args.deepspeed and torch.distributed.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if task_args.optimizer != "badm":
        args.optim = task_args.optimizer
    tokenizer = load_tokenizer(model_args, out)
    model = build_model(model_args, tokenizer)
    tasks = task_args.instruction_tasks.split(",") if task_args.instruction_tasks else None
    sizes = dict(seed=args.seed, num_train=task_args.num_train_examples, num_eval=task_args.num_eval_examples)
    kwargs: dict[str, Any] = {}
    if task_args.task in ("pretrain", "finetune"):
        raw = data.load_text_dataset(task_args.dataset, text_column=task_args.text_column,
                                     config_name=task_args.dataset_config, **sizes)
        ds = data.tokenize_for_causal_lm(raw, tokenizer, task_args.block_size, text_column=task_args.text_column)
        kwargs.update(data_collator=default_data_collator)
    else:
        ds = data.load_instruction_dataset(task_args.dataset, tasks=tasks, config_name=task_args.dataset_config, **sizes)
        ds = ds.select_columns(["prompt", "completion"])
        if task_args.task == "lora-sft":
            from peft import LoraConfig, get_peft_model

            targets = _lora_targets(model_args.lora_target_modules)
            model = get_peft_model(model, LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                                                     target_modules=targets, task_type="CAUSAL_LM"))
    if task_args.optimizer == "badm":
        kwargs["badm_config"] = badm
    trainer = _trainer_class(task_args.task, task_args.optimizer)(
        model=model, args=args, train_dataset=ds["train"], eval_dataset=ds["test"], processing_class=tokenizer,
        callbacks=[_Clock()], **kwargs)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics: dict[str, Any] = {"optimizer": task_args.optimizer, "task": task_args.task,
                               "train_loss": result.training_loss, **trainer.evaluate()}
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
    trainer.save_model(str(out))  # on every rank: under ZeRO-3 it gathers the partitioned weights
    if trainer.is_world_process_zero():
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        from hf_badm.app.plots import plot_runs

        plot_runs({task_args.optimizer: metrics}, out / "loss.png")
    return metrics


def _lora_targets(spec: str) -> str | list[str]:
    return spec if spec == "all-linear" else [m.strip() for m in spec.split(",") if m.strip()]
