"""``hf-badm train | compare | demo``: the console script.

A recipe (``hf_badm.app.recipe``) is a flat YAML mapping of fields; ``--field value`` after it
overrides one. The same command runs under ``accelerate launch -m hf_badm train ...`` and the
``deepspeed`` launcher. ``main`` is the only place that turns errors into a message and exit code.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from hf_badm.app import RecipeError, RunEnded
from hf_badm.app.callbacks import Stopped
from hf_badm.app.recipe import parse, read_recipe, recipe_parser
from hf_badm.app.learning_rates import COMPARE_LEARNING_RATES, COMPARE_RULE, compare_learning_rate, \
    refuse_shared_learning_rate
from hf_badm.app.learning_rates import DEMO_LEARNING_RATES as DEMO_DEFAULTS
from hf_badm.optim.local_solve import plain_solve

USAGE = """hf-badm COMMAND ...

commands:
  train RECIPE.yaml [--field value ...]   train one recipe (every recipe field can be overridden)
  compare RECIPE.yaml --optimizers badm,adamw [--learning_rates adamw=1e-3] [--field value ...]
                                          the same recipe per optimizer: table + loss plots
  demo [--output_dir DIR] [--max_steps N] BADM (plain and newton_schulz) vs Muon and AdamW on the built-in corpus
                                          (about a minute on 2 CPU cores)

`hf-badm COMMAND --help` lists every field."""

TRAIN_EPILOG = """
Tasks sft and lora-sft also take the fields of TRL's SFTConfig (max_length, packing, ...).

Data (--dataset): a directory of data files takes its split names from the file names: train.jsonl and
test.jsonl (or eval*, validation*, valid*, dev*) are the train and evaluation splits; files with none of
these names are all training data, and 5% of their rows are held out for evaluation.

Output: a run refuses an output_dir that holds a finished run (metrics.json, or a model without
checkpoints) unless --overwrite_output_dir true (which also removes that run's checkpoints), and one that
holds only checkpoints unless it resumes. --resume_from_checkpoint with no value (or true) resumes from the
latest complete checkpoint in output_dir, after checking every file of it against its manifest.json;
resuming a finished run is nothing to do. One run at a time writes an output_dir (.hf-badm.lock).
--save_steps N alone saves every N steps. SIGTERM or Ctrl-C saves a checkpoint at the end of the current
step (or of the last one) and stops, printing the command that continues."""
DEMO_LEARNING_RATES = ",".join(f"{k}={v:g}" for k, v in DEMO_DEFAULTS.items())
DEMO_OPTIMIZERS = "badm,badm-newton_schulz,muon,adamw"
ALIASES = {"adamw": "adamw_torch", "lion": "lion_32bit"}
DEMO_RECIPE: dict[str, Any] = {
    "task": "pretrain", "model_family": "gpt2", "model_size": "tiny", "block_size": 64, "num_train_examples": 3000,
    "per_device_train_batch_size": 16, "max_steps": 300, "learning_rate": 3.0, "lr_scheduler_type": "cosine",
    "warmup_steps": 20, "max_grad_norm": 1.0, "eval_strategy": "steps", "eval_steps": 50, "logging_steps": 10,
    "per_device_eval_batch_size": 64, "seed": 0,
}


def train(argv: list[str]) -> dict[str, Any] | None:
    """One recipe in this process (each rank of a distributed launch runs this)."""
    from hf_badm.app.launch import quiet_environment

    quiet_environment()  # before DeepSpeed loads (the Trainer imports it)
    from hf_badm.app.run import run

    if not argv or {"-h", "--help"} & set(argv):
        recipe_parser().print_help()
        print(TRAIN_EPILOG)
        return None
    recipe_path, overrides = (None, argv) if argv[0].startswith("--") else (argv[0], argv[1:])
    model_args, task_args, badm, args = parse(read_recipe(recipe_path), overrides, recipe_path or "recipe")
    import torch.distributed as dist

    from hf_badm.app.faults import install

    install()
    try:
        result = run(model_args, task_args, badm, args)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank tears its communicator down while another still talks to it
        return result
    except RunEnded as err:
        if err.resume is None:
            raise
        command = continue_command(argv, err.resume, args, task_args.overwrite_output_dir)
        raise RunEnded(f"{err}; continue with: {command}", err.code) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def continue_command(argv: list[str], resume: bool, args: Any, overwrite: bool) -> str:
    """The command that continues a stopped run: the same recipe and overrides, resuming from the latest complete
    checkpoint when there is one (never overwriting then), else the same run from its start."""
    kept, skip = [], False
    for token in argv:
        name = token.split("=", 1)[0]
        if skip and not token.startswith("--"):
            continue
        skip = name in ("--resume_from_checkpoint", "--overwrite_output_dir") and "=" not in token
        if skip or name in ("--resume_from_checkpoint", "--overwrite_output_dir"):
            continue
        kept.append(token)
    if resume:
        kept += ["--overwrite_output_dir", "false"] if overwrite else []
        kept.append("--resume_from_checkpoint")
    else:
        kept += ["--overwrite_output_dir", "true"] if overwrite else []
        kept += ["--resume_from_checkpoint", "false"] if args.resume_from_checkpoint else []
    launcher = "hf-badm" if args.world_size <= 1 else f"<the same launcher, {args.world_size} processes> -m hf_badm"
    return f"{launcher} train {shlex.join(kept)}"


def _compare_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description="Run one recipe per optimizer (same data "
                                "order, seed and token budget); print a markdown table and plot loss vs step and "
                                "wall-clock. Other --field value options override the recipe.")
    if not prog.endswith("demo"):
        p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--optimizers", default="badm,adamw", help="comma-separated: badm, badm-<preconditioner> (e.g. "
                   "badm-newton_schulz), muon (torch's Muon + AdamW, hf_badm.peers), normuon (NorMuon + AdamW), muon_qhadam (Muon + "
                   "QHAdam) and "
                   "Trainer optim names")
    p.add_argument("--learning_rates", default="", help="per optimizer, e.g. adamw=1e-3,sgd=0.05. "
                   + COMPARE_RULE.format(defaults=", ".join(f"{k}={v:g}" for k, v in COMPARE_LEARNING_RATES.items())))
    p.add_argument("--output_dir", default=None, help="where runs, table and plot go")
    p.error = _compare_error  # argparse would print its usage and exit; the app raises instead
    return p


def _compare_error(message: str) -> None:
    raise RecipeError(f"{message} (see `hf-badm compare --help`)")


def _learning_rates(spec: str) -> dict[str, float]:
    try:
        return {ALIASES.get(k, k): float(v) for k, v in (kv.split("=") for kv in spec.split(",") if kv)}
    except ValueError:
        raise RecipeError(f"--learning_rates takes name=value pairs, e.g. adamw=1e-3,muon=0.02, got {spec!r}") from None


def compare(argv: list[str], prog: str = "hf-badm compare", recipe: dict[str, Any] | None = None) -> str:
    """Each optimizer trains in its own process (clean peak-memory numbers) from the same initial weights
    (the recipe's seed), then one table and plot. Every run is checked before the first one starts."""
    from hf_badm.app.checks import check_sources
    from hf_badm.app.output import check_output_dir
    from hf_badm.app.plots import PLOT_SKIPPED, plot_runs

    parser = _compare_parser(prog)
    if {"-h", "--help"} & set(argv):
        parser.print_help()
        return ""
    opts, overrides = parser.parse_known_args(argv)
    recipe_path = getattr(opts, "recipe", None)
    recipe = read_recipe(recipe_path) if recipe is None else recipe
    name = Path(recipe_path).stem if recipe_path else "demo"
    out = Path(opts.output_dir or recipe.get("output_dir") or Path("outputs") / f"compare-{name}")
    refuse_shared_learning_rate(overrides)
    lrs = _learning_rates(opts.learning_rates)
    optimizers = [ALIASES.get(o.strip(), o.strip()) for o in opts.optimizers.split(",") if o.strip()]
    if not optimizers:
        raise RecipeError("--optimizers names no optimizer (e.g. --optimizers badm,adamw)")
    plan: dict[str, dict[str, Any]] = {}
    for optimizer in optimizers:
        run_recipe = {**recipe, "optimizer": optimizer, "output_dir": str(out / optimizer)}
        if optimizer == "badm" or optimizer.startswith("badm-"):  # the paper's BADM unless a preconditioner is named
            run_recipe.update(optimizer="badm", preconditioner=optimizer.removeprefix("badm").removeprefix("-")
                              or plain_solve())
        lr, source = compare_learning_rate(optimizer, recipe, lrs)
        if lr is not None:
            run_recipe["learning_rate"] = lr
        print(f"hf-badm: {optimizer} at learning rate {run_recipe.get('learning_rate', 'the Trainer default')}: "
              f"{source}", flush=True)
        model_args, task_args, _, args = parse(run_recipe, overrides, f"{recipe_path or name} ({optimizer})")
        check_output_dir(args, task_args)
        plan[optimizer] = run_recipe
    check_sources(model_args, task_args)  # the same model and data for every optimizer
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
    print("\n" + table + "\n\n" + (f"plot: {plot.resolve()}" if plot else PLOT_SKIPPED)
          + f"\ntable: {(out / 'comparison.md').resolve()}")
    if len({m.get("init_fingerprint") for m in runs.values()} - {None}) > 1:
        print("hf-badm: warning: the runs did not start from the same weights (init_fingerprint differs)",
              file=sys.stderr)
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
    """BADM (the paper's, and preconditioned with Newton-Schulz) vs Muon and AdamW pre-training a tiny GPT on the
    built-in corpus: the README's first command."""
    if not any(a.startswith("--learning_rates") for a in argv):
        argv = ["--learning_rates", DEMO_LEARNING_RATES, *argv]
    if not any(a.startswith("--optimizers") for a in argv):
        argv = ["--optimizers", DEMO_OPTIMIZERS, *argv]
    if not any(a.startswith("--overwrite_output_dir") for a in argv):
        argv = [*argv, "--overwrite_output_dir", "true"]  # the demo's output is its own: a rerun replaces it
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
    except RunEnded as err:
        print(f"hf-badm: {'' if err.code == 0 else 'error: '}{err}", file=sys.stderr)
        return err.code
    except (Stopped, KeyboardInterrupt) as err:  # a signal while the run was starting or ending: nothing half-written
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"hf-badm: error: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    return 0
