"""The recipe fields of ``hf-badm train`` that are not ``TrainingArguments`` or ``BADMConfig``.

Dataclasses for ``HfArgumentParser``: every field is a YAML key of a recipe and a ``--field`` option.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from typing import Optional

FAMILIES = ("gpt2", "llama", "mixtral", "qwen2_moe")
SIZES = {"tiny": dict(hidden=64, layers=2, heads=4), "small": dict(hidden=128, layers=4, heads=4)}
TASKS = ("pretrain", "finetune", "sft", "lora-sft")
SFT_TASKS = ("sft", "lora-sft")
# transformers 4.x's TrainingArguments has a field of that name (which its Trainer leaves unused): there the option is
# TrainingArguments', and recipe.parse copies its value here.
OVERWRITE_IN_TRAINING_ARGS = int(metadata.version("transformers").split(".")[0]) < 5

DATASET_HELP = (
    "'builtin' (generated corpus / instruction tasks); a local .txt (a row per line), .jsonl, .json, .parquet or .csv "
    "file; a directory written by datasets' save_to_disk; a directory of such files, where file names become split "
    "names (a file or folder named train*, test* / eval*, validation* / valid* / dev* is that split, e.g. "
    "train.jsonl + test.jsonl; files with none of these names are all training data); or a hub dataset id. Without a "
    "test or validation split, 5%% of the training rows are held out.")


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
    dataset: str = field(default="builtin", metadata={"help": DATASET_HELP})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Hub dataset configuration name."})
    text_column: str = field(default="text", metadata={"help": "Text column (pretrain / finetune)."})
    num_train_examples: int = field(default=4000, metadata={"help": "Built-in data: training documents or prompts."})
    num_eval_examples: int = field(default=200, metadata={"help": "Built-in data: held-out documents or prompts."})
    instruction_tasks: Optional[str] = field(default=None, metadata={
        "help": "Built-in instruction tasks, comma-separated (add,sub,mul,copy,reverse,lookup,sort); default all."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    optimizer: str = field(default="badm", metadata={
        "help": "'badm', 'muon' (torch's Muon + AdamW, hf_badm.peers), 'normuon', 'muon_qhadam' (Muon + QHAdam), or "
                "any Trainer optim name for comparison "
                "(adamw_torch, sgd, adafactor, lion_32bit, ...)."})
    muon_adamw_lr: Optional[float] = field(default=None, metadata={
        "help": "optimizer muon, normuon, muon_qhadam: learning rate of AdamW (QHAdam) on the tensors Muon does not "
                "orthogonalise (embeddings, LM head, norms, biases). Default: hf_badm.peers.MUON_ADAMW_LR (0.1)."})
    qhadam_nu: Optional[float] = field(default=None, metadata={
        "help": "optimizer muon_qhadam: QHAdam's nu1 on the other tensors (its beta1 is adam_beta1). Default: "
                "hf_badm.peers.QHADAM_NU (8/9, the nu of BADM's normalized solve at its rho/sigma 9)."})
    solve_report: Optional[str] = field(default=None, metadata={
        "help": "optimizer badm: write every trainable tensor's name, shape, role, local solve and parts (a fused "
                "projection's) to this file, tab-separated, at start-up (the one-line summary is always printed)."})
    exact_match_examples: int = field(default=64, metadata={"help": "Held-out prompts scored by exact match (sft tasks)."})
    allow_partial_resume: bool = field(default=False, metadata={
        "help": "Resume from a checkpoint that lacks some files (scheduler.pt, rng_state*.pth, optimizer or slot "
                "files), saying which: the run then differs from the one it continues. Without it such a resume is "
                "refused."})
    max_skipped_steps: int = field(default=10, metadata={
        "help": "Stop the run (exit 1, no model written) after this many consecutive optimizer steps skipped for "
                "non-finite gradients (BADM's nonfinite: skip)."})
    overwrite_output_dir: bool = field(default=False, init=not OVERWRITE_IN_TRAINING_ARGS, metadata={
        "help": "Replace a finished run in output_dir (its model, metrics and checkpoints). Without it, a run into an "
                "output_dir that holds a model or metrics.json is refused, and one that holds only checkpoints must "
                "resume (--resume_from_checkpoint) or overwrite."})
