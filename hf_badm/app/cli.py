"""``hf-badm train | compare | demo``: YAML recipes parsed by HfArgumentParser, overridable per field.

A recipe is a flat YAML mapping of fields of ``ModelArguments``, ``TaskArguments``, ``BADMConfig``
and ``transformers.TrainingArguments``; ``--field value`` after the recipe overrides it. The same
command runs under ``accelerate launch -m hf_badm train ...`` and the ``deepspeed`` launcher.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from hf_badm.app import RecipeError
from hf_badm.optim.defaults import COMPARE_LEARNING_RATES
from hf_badm.optim.defaults import DEMO_LEARNING_RATES as DEMO_DEFAULTS

USAGE = """hf-badm COMMAND ...

commands:
  train RECIPE.yaml [--field value ...]   train one recipe (every recipe field can be overridden)
  compare RECIPE.yaml --optimizers badm,adamw [--learning_rates adamw=1e-3] [--field value ...]
                                          the same recipe per optimizer: table + loss plots
  demo [--output_dir DIR] [--max_steps N] BADM (plain and newton_schulz) vs AdamW on the built-in corpus
                                          (about a minute on 2 CPU cores)

`hf-badm COMMAND --help` lists every field."""

# Settings of a CLI run unless the recipe or command line says otherwise.
CLI_DEFAULTS: dict[str, Any] = {"report_to": "none", "include_num_input_tokens_seen": True, "save_strategy": "no",
                                "logging_steps": 10}
# Comparison optimizers keep their own scale of learning rate (the table in hf_badm.optim.defaults); BADM's
# comes from the recipe (lr = 1/sigma).
DEFAULT_LEARNING_RATES = COMPARE_LEARNING_RATES
DEMO_LEARNING_RATES = ",".join(f"{k}={v:g}" for k, v in DEMO_DEFAULTS.items())
DEMO_OPTIMIZERS = "badm,badm-newton_schulz,adamw"
ALIASES = {"adamw": "adamw_torch", "lion": "lion_32bit"}
DEMO_RECIPE: dict[str, Any] = {
    "task": "pretrain", "model_family": "gpt2", "model_size": "tiny", "block_size": 64, "num_train_examples": 3000,
    "per_device_train_batch_size": 16, "max_steps": 300, "learning_rate": 3.0, "lr_scheduler_type": "cosine",
    "warmup_steps": 20, "max_grad_norm": 1.0, "eval_strategy": "steps", "eval_steps": 50, "logging_steps": 10,
    "per_device_eval_batch_size": 64, "seed": 0,
}


def recipe_parser(task: str = "pretrain"):
    """Instruction-tuning tasks take TRL's SFTConfig (TrainingArguments plus max_length, packing, ...)."""
    from transformers import HfArgumentParser, TrainingArguments

    from hf_badm.config import BADMConfig
    from hf_badm.app.run import SFT_TASKS, ModelArguments, TaskArguments

    if task in SFT_TASKS:
        from trl import SFTConfig as TrainingArguments  # noqa: N814
    parser = HfArgumentParser((ModelArguments, TaskArguments, BADMConfig, TrainingArguments), allow_abbrev=False)
    parser.prog, parser.usage = "hf-badm train", "hf-badm train RECIPE.yaml [--field value ...]"
    parser.error = _argument_error  # argparse would print usage and exit; the app raises instead
    return parser


def _argument_error(message: str) -> None:
    raise RecipeError(f"{message} (see `hf-badm train --help`)")


def _tokens(key: str, value: Any) -> list[str]:
    """A YAML value as command-line tokens, so argparse type-checks recipe and overrides alike."""
    if isinstance(value, dict):
        return [f"--{key}", json.dumps(value)]
    if isinstance(value, (list, tuple)):
        return [f"--{key}", *map(str, value)]
    return [f"--{key}", "none" if value is None else str(value)]


def read_recipe(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        recipe = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}")
    if not isinstance(recipe, dict):
        raise RecipeError(f"{path} must be a mapping of field: value")
    return recipe


def _task(recipe: dict[str, Any], overrides: list[str]) -> str:
    task = str(recipe.get("task", "pretrain"))
    for i, token in enumerate(overrides):
        if token == "--task" and i + 1 < len(overrides):
            task = overrides[i + 1]
        elif token.startswith("--task="):
            task = token.split("=", 1)[1]
    return task


def parse(recipe: dict[str, Any], overrides: list[str], source: str = "recipe"):
    """(model, task, badm, training) arguments from a recipe dict plus command-line overrides."""
    parser = recipe_parser(_task(recipe, overrides))
    known = {a.dest for a in parser._actions}
    unknown = sorted(k for k in recipe if k not in known)
    if unknown:
        raise RecipeError(f"{source}: unknown field(s) {', '.join(unknown)} (see `hf-badm train --help`)")
    merged = {**CLI_DEFAULTS, **recipe}
    merged.setdefault("output_dir", str(Path("outputs") / Path(source).stem))
    tokens = [t for k, v in merged.items() for t in _tokens(k, v)]
    try:
        *parsed, rest = parser.parse_args_into_dataclasses(args=tokens + overrides, return_remaining_strings=True)
    except ValueError as err:  # a dataclass's own validation (BADMConfig, TrainingArguments)
        raise RecipeError(str(err).splitlines()[0])
    if rest:
        raise RecipeError(f"unknown argument(s) {' '.join(rest)} (see `hf-badm train --help`)")
    return parsed


def train(argv: list[str]) -> dict[str, Any] | None:
    from hf_badm.app.run import run

    if not argv or argv[0] in ("-h", "--help"):
        recipe_parser().print_help()
        print("\nTasks sft and lora-sft also take the fields of TRL's SFTConfig (max_length, packing, ...).")
        return None
    recipe_path, overrides = (None, argv) if argv[0].startswith("--") else (argv[0], argv[1:])
    model_args, task_args, badm, args = parse(read_recipe(recipe_path), overrides, recipe_path or "recipe")
    import torch.distributed as dist

    try:
        result = run(model_args, task_args, badm, args)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank tears its communicator down while another still talks to it
        return result
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _compare_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description="Run one recipe per optimizer (same data "
                                "order, seed and token budget); print a markdown table and plot loss vs step and "
                                "wall-clock. Other --field value options override the recipe.")
    if not prog.endswith("demo"):
        p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--optimizers", default="badm,adamw", help="comma-separated: badm, badm-<preconditioner> (e.g. "
                   "badm-newton_schulz) and Trainer optim names")
    p.add_argument("--learning_rates", default="", help="per optimizer, e.g. adamw=1e-3,sgd=0.05 "
                   f"(defaults: {DEFAULT_LEARNING_RATES}; badm uses the recipe's learning_rate)")
    p.add_argument("--output_dir", default=None, help="where runs, table and plot go")
    return p


def compare(argv: list[str], prog: str = "hf-badm compare", recipe: dict[str, Any] | None = None) -> str:
    """Each optimizer trains in its own process (clean peak-memory numbers), then one table and plot."""
    from hf_badm.app.plots import plot_runs

    opts, overrides = _compare_parser(prog).parse_known_args(argv)
    recipe_path = getattr(opts, "recipe", None)
    recipe = read_recipe(recipe_path) if recipe is None else recipe
    name = Path(recipe_path).stem if recipe_path else "demo"
    out = Path(opts.output_dir or recipe.get("output_dir") or Path("outputs") / f"compare-{name}")
    lrs = {ALIASES.get(k, k): float(v) for k, v in (kv.split("=") for kv in opts.learning_rates.split(",") if kv)}
    plan: dict[str, dict[str, Any]] = {}
    for optimizer in [ALIASES.get(o.strip(), o.strip()) for o in opts.optimizers.split(",") if o.strip()]:
        run_recipe = {**recipe, "optimizer": optimizer, "output_dir": str(out / optimizer)}
        if optimizer.startswith("badm-"):  # preconditioned BADM
            run_recipe.update(optimizer="badm", preconditioner=optimizer.removeprefix("badm-"))
        lr = lrs.get(optimizer, DEFAULT_LEARNING_RATES.get(optimizer))
        if lr is not None:
            run_recipe["learning_rate"] = lr
        parse(run_recipe, overrides, f"{recipe_path or name} ({optimizer})")  # validate all before any training
        plan[optimizer] = run_recipe
    runs: dict[str, dict[str, Any]] = {}
    for optimizer, run_recipe in plan.items():
        recipe_file = out / f"{optimizer}.yaml"
        recipe_file.parent.mkdir(parents=True, exist_ok=True)
        recipe_file.write_text(yaml.safe_dump(run_recipe))
        print(f"== {optimizer}: hf-badm train {recipe_file} {' '.join(overrides)}", flush=True)
        done = subprocess.run([sys.executable, "-m", "hf_badm", "train", str(recipe_file), *overrides,
                               "--output_dir", str(out / optimizer)])
        if done.returncode != 0:
            raise RecipeError(f"the {optimizer} run failed (exit {done.returncode})")
        runs[optimizer] = json.loads((out / optimizer / "metrics.json").read_text())
    table = comparison_table(runs)
    (out / "comparison.md").write_text(table + "\n")
    (out / "comparison.json").write_text(json.dumps(runs, indent=2, default=str))
    plot = plot_runs(runs, out / "comparison.png", title=f"{name}: {', '.join(runs)}")
    print("\n" + table + f"\n\nplot: {plot.resolve()}\ntable: {(out / 'comparison.md').resolve()}")
    return table


def comparison_table(runs: dict[str, dict[str, Any]]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    rows = ["| optimizer | learning rate | final train loss | eval loss | exact match | tokens/s | peak memory (MB) "
            "| wall time (s) |", "|---|---|---|---|---|---|---|---|"]
    for name, m in runs.items():
        train_losses = [h["loss"] for h in m["log_history"] if "loss" in h]
        rows.append(f"| {name} | {m['recipe']['learning_rate']:g} | {fmt(train_losses[-1] if train_losses else None, '.4f')} "
                    f"| {fmt(m.get('eval_loss'), '.4f')} | {fmt(m.get('exact_match'), '.3f')} "
                    f"| {fmt(m.get('tokens_per_second'), ',.0f')} | {fmt(m.get('peak_memory_mb'), ',.0f')} "
                    f"| {fmt(m.get('train_runtime'), '.1f')} |")
    return "\n".join(rows)


def demo(argv: list[str]) -> str:
    """BADM (the paper's, and preconditioned with Newton-Schulz) vs AdamW pre-training a tiny GPT on the
    built-in corpus: the README's first command."""
    if not any(a.startswith("--learning_rates") for a in argv):
        argv = ["--learning_rates", DEMO_LEARNING_RATES, *argv]
    if not any(a.startswith("--optimizers") for a in argv):
        argv = ["--optimizers", DEMO_OPTIMIZERS, *argv]
    return compare(argv, prog="hf-badm demo", recipe=dict(DEMO_RECIPE))


COMMANDS = {"train": train, "compare": compare, "demo": demo}


def main(argv: list[str] | None = None) -> int:
    """The console script: the one place where errors become a one-line message and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        if argv[0] not in COMMANDS:
            raise RecipeError(f"unknown command {argv[0]!r} (commands: {', '.join(COMMANDS)})")
        COMMANDS[argv[0]](argv[1:])
    except RecipeError as err:
        print(f"hf-badm: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
