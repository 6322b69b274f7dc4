"""What a run checks before it writes anything: recipe values, model / tokenizer / data sources, the output_dir.

Each check raises ``RecipeError`` with one line naming the field or file and what to do instead.
"""

from __future__ import annotations

import codecs
import importlib.util
import math
import os
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from hf_badm.app import RecipeError
from hf_badm.app.arguments import ModelArguments, TaskArguments
from hf_badm.app.data import FILE_BUILDERS
from hf_badm.optim.local_solve import LOCAL_SOLVES
from hf_badm.optim.validation import PENALTY_RANGE, penalty
from hf_badm.peers import PEERS

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from hf_badm.config import BADMConfig

COUNTS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
          "eval_accumulation_steps", "save_total_limit")
INTERVALS = ("logging_steps", "save_steps", "eval_steps")
_TRUE = ("1", "true", "yes", "on")
# The built-in corpus is generated in memory: beyond this many examples a run would grow without bound first.
GENERATED_LIMIT = 1_000_000
# report_to names and the packages their Trainer callbacks import (any one of them)
REPORTERS = {"wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",),
             "comet_ml": ("comet_ml",), "clearml": ("clearml",), "neptune": ("neptune",), "dvclive": ("dvclive",),
             "codecarbon": ("codecarbon",), "azure_ml": ("azureml",), "swanlab": ("swanlab",),
             "trackio": ("trackio",), "flyte": ("flytekit",), "dagshub": ("dagshub",)}


def check_values(model_args: ModelArguments, task_args: TaskArguments, badm: BADMConfig,
                 args: TrainingArguments) -> None:
    """Numbers and combinations that would fail mid-run or train silently wrong."""
    _check_finite(model_args, task_args, badm, args)
    _check_counts(model_args, task_args, args)
    lr, wd, clip = args.learning_rate, args.weight_decay, args.max_grad_norm
    if not (math.isfinite(lr) and lr > 0):
        raise RecipeError(f"learning_rate must be a finite number > 0, got {lr}")
    if not (math.isfinite(wd) and wd >= 0):
        raise RecipeError(f"weight_decay must be a finite number >= 0, got {wd}")
    if clip is not None and not (math.isfinite(clip) and clip >= 0):
        raise RecipeError(f"max_grad_norm must be a finite number >= 0 (0 turns clipping off), got {clip}")
    muon_lr = task_args.muon_adamw_lr
    if muon_lr is not None and not (math.isfinite(muon_lr) and muon_lr > 0):
        raise RecipeError(f"muon_adamw_lr must be a finite number > 0, got {muon_lr}")
    nu = task_args.qhadam_nu
    if nu is not None and not 0 <= nu <= 1:
        raise RecipeError(f"qhadam_nu must lie in [0, 1] (0: Adam's step from the gradient alone, 1: Adam), got {nu}")
    for name, least in (("num_train_examples", 2), ("num_eval_examples", 1), ("block_size", 2)):
        if getattr(task_args, name) < least:
            raise RecipeError(f"{name} must be at least {least}, got {getattr(task_args, name)}")
        if name != "block_size" and task_args.dataset == "builtin" and getattr(task_args, name) > GENERATED_LIMIT:
            raise RecipeError(f"{name}={getattr(task_args, name)}: the built-in corpus is generated in memory, at most "
                              f"{GENERATED_LIMIT:,} examples (use a dataset file or hub dataset for more)")
    if not str(args.output_dir or "").strip():
        raise RecipeError("output_dir is empty: name the directory the run writes into")
    _check_reporters(args.report_to)
    _check_optimizer(task_args.optimizer)
    if task_args.optimizer == "badm":
        _check_badm(badm, args)
    _check_decay(task_args, badm, args)


def _check_reporters(report_to: list[str] | str | None) -> None:
    """A named logger whose package is missing fails inside the Trainer with a traceback: named here."""
    for name in [report_to] if isinstance(report_to, str) else report_to or []:
        packages = REPORTERS.get(name, ())
        if packages and not any(importlib.util.find_spec(p) for p in packages):
            raise RecipeError(f"report_to {name}: the {packages[0]} package is not installed (pip install "
                              f"{packages[0]}, or report_to: none)")


def _check_finite(*settings: object) -> None:
    """No NaN or infinity in any numeric field: a step count, interval or seed of inf/nan means nothing."""
    for obj in settings:
        for f in fields(obj):  # type: ignore[arg-type]
            value = getattr(obj, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise RecipeError(f"{f.name} must be a finite number, got {value}")


def _check_counts(model_args: ModelArguments, task_args: TaskArguments, args: TrainingArguments) -> None:
    """Counts, intervals and seeds within the ranges that mean something."""
    at_least_one = [(name, getattr(args, name)) for name in COUNTS if getattr(args, name, None) is not None]
    at_least_one += [("lora_r", model_args.lora_r), ("max_skipped_steps", task_args.max_skipped_steps)]
    if (max_length := getattr(args, "max_length", None)) is not None:  # TRL's SFTConfig
        at_least_one.append(("max_length", max_length))
    for name, value in at_least_one:
        if value < 1:
            raise RecipeError(f"{name} must be at least 1, got {value}")
    if args.max_steps < 1 and args.max_steps != -1:
        raise RecipeError(f"max_steps must be at least 1 (or -1: train num_train_epochs), got {args.max_steps}")
    if args.max_steps == -1 and not args.num_train_epochs > 0:
        raise RecipeError(f"num_train_epochs must be > 0 when max_steps is -1, got {args.num_train_epochs}")
    for name in INTERVALS:
        if (value := getattr(args, name)) is not None and not value > 0:
            raise RecipeError(f"{name} must be > 0 (a number of steps, or a fraction of the run below 1), got {value}")
    for name, value in (("warmup_steps", args.warmup_steps), ("dataloader_num_workers", args.dataloader_num_workers),
                        ("exact_match_examples", task_args.exact_match_examples)):
        if value < 0:
            raise RecipeError(f"{name} must be >= 0, got {value}")
    for name in ("seed", "data_seed"):
        if (value := getattr(args, name)) is not None and not 0 <= value < 2**32:
            raise RecipeError(f"{name} must be in 0..2**32-1 (numpy's seed range), got {value}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise RecipeError(f"{name} must be in [0, 1), got {getattr(args, name)}")
    if model_args.vocab_size < 260:
        raise RecipeError(f"vocab_size must be at least 260 (256 bytes and 4 special tokens), got {model_args.vocab_size}")
    if not model_args.lora_alpha > 0:
        raise RecipeError(f"lora_alpha must be > 0, got {model_args.lora_alpha}")


def _check_decay(task_args: TaskArguments, badm: BADMConfig, args: TrainingArguments) -> None:
    """Decoupled weight decay multiplies the weights by 1 - weight_decay * step size: at 1 or more it zeroes or
    flips them every step (1e308 drives them to infinity)."""
    wd = args.weight_decay
    if wd == 0:
        return
    steps = {"learning_rate": args.learning_rate}
    if task_args.optimizer == "badm":
        steps = {"1/sigma": 1 / badm.sigma} if badm.sigma is not None else steps
        if LOCAL_SOLVES[badm.preconditioner].orthogonalises:
            steps["1/elementwise_sigma"] = 1 / badm.group_overrides()["sigma"]
    if task_args.optimizer in PEERS and task_args.muon_adamw_lr is not None:
        steps["muon_adamw_lr"] = task_args.muon_adamw_lr
    for name, step in steps.items():
        if wd * step >= 1:
            raise RecipeError(f"weight_decay={wd:g} times {name}={step:g} is {wd * step:g}: decoupled decay scales the "
                              "weights by 1 - weight_decay * step size, which must stay above 0; use a smaller "
                              "weight_decay")


def _check_optimizer(name: str) -> None:
    from transformers.training_args import OptimizerNames

    if name != "badm" and name not in PEERS and name not in {o.value for o in OptimizerNames}:
        raise RecipeError(f"optimizer {name!r} is not badm, {', '.join(PEERS)} or a Trainer optim name (adamw_torch, "
                          "sgd, adafactor, lion_32bit, ...)")


def _check_badm(badm: BADMConfig, args: TrainingArguments) -> None:
    if badm.sigma is None:  # BADMConfig checked sigma, rho and their elementwise forms (optim/settings.py)
        try:
            penalty("sigma", 1 / args.learning_rate)
        except ValueError:
            low, high = PENALTY_RANGE
            raise RecipeError(f"learning_rate={args.learning_rate:g} gives BADM sigma = 1/learning_rate outside "
                              f"{low:g}..{high:g}: use a learning rate in {1 / high:g}..{1 / low:g} or set "
                              "sigma") from None
    k = badm.sub_batches_per_micro_batch
    refusal = badm.engine_refusal(deepspeed=bool(args.deepspeed), fsdp=bool(args.fsdp), fp16=args.fp16)
    if refusal is not None:
        raise RecipeError(refusal)
    if badm.mode == "per_sub_batch":
        if k > args.per_device_train_batch_size:
            raise RecipeError(f"sub_batches_per_micro_batch={k} exceeds per_device_train_batch_size="
                              f"{args.per_device_train_batch_size}: each sub-batch needs at least one example")
    elif k > 1:
        raise RecipeError(f"sub_batches_per_micro_batch={k} splits micro-batches only in mode per_sub_batch (fused "
                          "consumes the accumulated gradient): set mode: per_sub_batch, or remove it")


def check_sources(model_args: ModelArguments, task_args: TaskArguments) -> None:
    """The model, tokenizer and data a run reads exist (locally, or as a hub id that can be reached)."""
    if task_args.task in ("finetune", "lora-sft") and not model_args.model_name_or_path:
        raise RecipeError(f"task {task_args.task} starts from a trained model: set model_name_or_path (e.g. the "
                          "output_dir of a pretrain recipe)")
    for name in ("model_name_or_path", "tokenizer_name_or_path"):
        if value := getattr(model_args, name):
            _check_pretrained(name, value)
    if task_args.dataset != "builtin":
        _check_dataset(task_args.dataset)


def _check_pretrained(name: str, value: str) -> None:
    if Path(value).expanduser().exists():
        return
    producer = _producing_recipe(value)
    if producer is not None:
        raise RecipeError(f"{name}: directory not found: {value}; it is the output_dir of {producer}: run "
                          f"`hf-badm train {producer}` first")
    if _looks_local(value):
        raise RecipeError(f"{name}: directory not found: {value}")
    _check_hub(name, value, "model")


def _check_dataset(spec: str) -> None:
    path = Path(spec).expanduser()
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise RecipeError(f"dataset: {spec} is not a regular file or directory (a device, pipe or socket)")
    if path.is_file():
        check_data_file(path)
    elif path.is_dir():
        check_data_dir(path)
    elif _looks_local(spec) or path.suffix.lower() in FILE_BUILDERS:
        raise RecipeError(f"dataset: file or directory not found: {spec}")
    else:
        _check_hub("dataset", spec, "dataset")


def check_data_dir(path: Path) -> None:
    """A directory of data files: each one text with a row, all of one type (datasets would load only the files
    of its most common type, silently dropping the others). A directory saved by datasets is left to it."""
    if any((path / f).exists() for f in ("dataset_dict.json", "state.json")):
        return
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in FILE_BUILDERS
                   and not any(part.startswith((".", "_")) for part in f.relative_to(path).parts))
    if not files:
        raise RecipeError(f"dataset: {path} holds no data file ({', '.join(FILE_BUILDERS)})")
    kinds = {FILE_BUILDERS[f.suffix.lower()]: f for f in files}
    if len(kinds) > 1:
        named = ", ".join(f"{f.name} ({kind})" for kind, f in kinds.items())
        raise RecipeError(f"dataset: {path} mixes data file types ({named}): datasets would load one type and drop "
                          "the others; use one type")
    for f in files:
        check_data_file(f, least_rows=1)


def check_data_file(path: Path, least_rows: int = 2) -> None:
    """A data file of a known type with ``least_rows`` rows (a train and a held-out one when it is all the data),
    not binary or blank."""
    suffix = path.suffix.lower()
    if suffix not in FILE_BUILDERS:
        raise RecipeError(f"dataset: {path} has unsupported type {suffix or '(none)'!r}; use one of "
                          f"{', '.join(FILE_BUILDERS)}")
    if path.stat().st_size == 0:
        raise RecipeError(f"dataset: {path} is empty")
    if FILE_BUILDERS[suffix] == "parquet":
        return
    rows, decoder = 0, codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as f:
        for line in f:
            try:
                text = decoder.decode(line)
            except UnicodeDecodeError:
                raise RecipeError(f"dataset: {path} is not UTF-8 text (a binary file?)") from None
            if "\0" in text:
                raise RecipeError(f"dataset: {path} is not text (it holds NUL bytes)")
            rows += bool(text.strip())
            if rows > least_rows:  # enough rows, even under a csv header
                return
    if rows == 0:
        raise RecipeError(f"dataset: {path} has only blank lines")
    if least_rows > 1 and suffix in (".txt", ".text", ".jsonl", ".csv"):
        raise RecipeError(f"dataset: {path} has {rows} line(s): too few to hold out an evaluation split")


def _looks_local(value: str) -> bool:
    """A path rather than a hub id: starts like one, or is not a valid repo id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if value.startswith((".", "/", "~")):
        return True
    try:
        validate_repo_id(value)
    except HFValidationError:
        return True
    return False


def _check_hub(name: str, repo_id: str, repo_type: str) -> None:
    """Fast answers where the hub cannot help: offline mode without a cached copy, an unknown id, no network."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE" if repo_type == "dataset" else "TRANSFORMERS_OFFLINE")
               if os.environ.get(v, "").lower() in _TRUE]
    if offline:
        cached = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}"
        if not cached.exists():
            raise RecipeError(f"{name}: {repo_id} is not a local path, and {offline[0]} is set with no cached copy "
                              "of it on the hub")
        return
    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=10)
    except GatedRepoError:
        return  # it exists; from_pretrained / load_dataset say what access needs
    except RepositoryNotFoundError:
        raise RecipeError(f"{name}: {repo_id} is neither a local path nor a {repo_type} on the hub") from None
    except Exception as err:  # noqa: BLE001 (network failures come as many types)
        raise RecipeError(f"{name}: {repo_id} is not a local path and the hub did not answer ({type(err).__name__}); "
                          "without network, set HF_HUB_OFFLINE=1 to use a cached copy") from None


def _producing_recipe(path: str) -> str | None:
    """The shipped recipe whose output_dir is ``path`` (so a message can say what to run first), found under
    ./recipes, then under the project's own recipes/."""
    target = Path(path).expanduser().resolve()
    for root in (Path("recipes"), Path(__file__).resolve().parents[2] / "recipes"):
        for recipe in sorted(root.glob("*/*.yaml")):
            try:
                fields = yaml.safe_load(recipe.read_text())
            except yaml.YAMLError:
                continue
            out = fields.get("output_dir") if isinstance(fields, dict) else None
            if out and Path(out).expanduser().resolve() == target:
                return str(recipe)
    return None
