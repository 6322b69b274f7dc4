"""LoRA instruction tuning of a GPT-2 pre-trained on stories and task examples (docs/benchmarks.md, "Instruction
tuning"): exact match and held-out loss, each optimizer over its own lr grid, its best re-run to more seeds."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

SECTION = "## Instruction tuning: LoRA SFT exact match"
# key -> (label, recipe fields, learning-rate grid)
OPTIMIZERS: dict[str, tuple[str, dict[str, Any], list[float]]] = {
    "adamw_torch": ("AdamW", {"optimizer": "adamw_torch"}, [1e-3, 3e-3, 1e-2, 3e-2]),
    "muon": ("Muon (+ AdamW elsewhere)", {"optimizer": "muon"}, [0.01, 0.03, 0.1, 0.3]),
    "badm": ("BADM fused", {"optimizer": "badm"}, [1.0, 3.0, 10.0, 30.0]),
    "badm_norm": ("BADM normalized", {"optimizer": "badm", "preconditioner": "normalized"}, [1e-3, 3e-3, 1e-2, 3e-2]),
    # LoRA's A and B are linear maps (hf_badm.roles: orthogonalised by default). Left elementwise, a LoRA run has no
    # matrix for newton_schulz (refused at start-up): its elementwise solve on every adapter is "badm_norm".
    "badm_ns": ("BADM newton_schulz", {"optimizer": "badm", "preconditioner": "newton_schulz"},
                [0.003, 0.01, 0.03, 0.1, 0.3]),
}
DEFAULT_OPTIMIZERS = ("adamw_torch", "muon", "badm", "badm_norm", "badm_ns")


def pretraining_mix(out_dir: Path, stories: int, task_examples: int, tasks: list[str] | None) -> Path:
    """A dataset directory (train.jsonl, test.jsonl) of built-in stories and task examples as plain text, shuffled."""
    from hf_badm.app.data import generate_corpus, instruction_examples

    path = out_dir / f"pretrain-mix-{stories}-{task_examples}-{'-'.join(tasks or ['all'])}"
    if not (path / "test.jsonl").exists():
        texts = generate_corpus(stories, seed=0) + [e["prompt"] + e["completion"] for e in
                                                    instruction_examples(task_examples, seed=12345, tasks=tasks)]
        random.Random(0).shuffle(texts)
        held_out = max(1, len(texts) // 50)
        path.mkdir(parents=True, exist_ok=True)
        for name, part in (("test", texts[:held_out]), ("train", texts[held_out:])):
            (path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    return path


def main(argv: list[str] | None = None) -> None:
    p = bc.parser(__doc__, "sft")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"])
    p.add_argument("--tasks", default="copy,lookup", help="built-in instruction tasks (comma-separated; all: "
                   "add,sub,mul,copy,reverse,lookup,sort)")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--pretrain-task-examples", type=int, default=3000, help="task examples in the pre-training mix "
                   "(beside 3000 stories; 0: stories only)")
    p.add_argument("--steps", type=int, default=300, help="LoRA SFT steps (batch 16)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS), help=f"of {', '.join(OPTIMIZERS)}")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--examples", type=int, default=128, help="held-out prompts scored by exact match")
    a = p.parse_args(argv)
    command = bc.command_line()
    opts = a.optimizers.split(",")
    grids = {o: OPTIMIZERS[o][2] for o in opts}
    num_train, num_eval, stories = 4000, 200, 3000
    if a.smoke:
        bc.smoke_paths(a, "sft")
        a.pretrain_steps, a.steps, a.examples, a.seeds, num_train, num_eval, stories = 4, 4, 4, 1, 100, 20, 100
        a.pretrain_task_examples = min(a.pretrain_task_examples, 100)
        grids = {o: g[1:2] for o, g in grids.items()}
    bc.setup(a)
    tasks = a.tasks.split(",") if a.tasks else None
    results = bc.Results(a.results)
    mix = pretraining_mix(a.out_dir, stories, a.pretrain_task_examples, tasks) if a.pretrain_task_examples else "builtin"
    base_dir = a.out_dir / f"base-{a.size}-{a.pretrain_steps}-{Path(mix).name}"
    if not (base_dir / "metrics.json").exists():
        bc.train({**bc.BASE_RECIPE, "model_size": a.size, "optimizer": "adamw_torch",
                  "learning_rate": 1e-2 if a.size == "tiny" else 3e-3, "dataset": str(mix), "num_train_examples": stories,
                  "max_steps": a.pretrain_steps, "eval_strategy": "no", "output_dir": str(base_dir),
                  "use_cpu": a.device == "cpu"})
    setting = f"{a.size}|{Path(mix).name}|base={a.pretrain_steps}|tasks={a.tasks}|r={a.lora_r}|steps={a.steps}"

    def sft(opt: str, lr: float, seed: int, steps: int | None = None) -> dict[str, Any]:
        steps = a.steps if steps is None else steps
        key = f"{setting}|{opt}|lr={lr:g}|seed={seed}|{steps}"
        done = results.get(key)
        if done:
            return done
        r: dict[str, Any] = {
            "task": "lora-sft", "model_name_or_path": str(base_dir), "dataset": "builtin", "instruction_tasks": a.tasks,
            "num_train_examples": num_train, "num_eval_examples": num_eval, "lora_r": a.lora_r,
            "lora_alpha": 2 * a.lora_r, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 64,
            "max_length": 64, "bf16": False, "gradient_checkpointing": False, "max_steps": steps, "learning_rate": lr,
            "lr_scheduler_type": "cosine", "warmup_steps": min(10, steps), "max_grad_norm": 1.0, "logging_steps": 10,
            "eval_strategy": "steps", "eval_steps": max(1, steps // 10), "exact_match_examples": a.examples,
            "report_to": "none", "save_strategy": "no", "disable_tqdm": True, "seed": seed, "overwrite_output_dir": True,
            "output_dir": str(a.out_dir / "runs" / bc.run_key(key)), "use_cpu": a.device == "cpu", **OPTIMIZERS[opt][1]}
        if opt == "badm":
            r["rho"] = 9.0 / lr  # plain BADM at rho/sigma 9 (beta 0.9)
        summary = bc.train(r)
        entry = {"key": key, "setting": setting, "optimizer": opt, "learning_rate": lr, "seed": seed, "steps": steps,
                 **summary}
        results.add(entry)
        print(f"{key}: eval {bc.fmt(entry['final_eval_loss'], '.4f')} exact match {bc.fmt(entry['exact_match'], '.3f')}",
              flush=True)
        return entry

    base_em = sft("adamw_torch", 1e-12, 0, steps=1)["exact_match"]  # the base before LoRA (one step at lr ~ 0)
    for i in range(max(len(g) for g in grids.values())):  # interleaved across optimizers
        for opt, grid in grids.items():
            if i < len(grid):
                sft(opt, grid[i], 0)
    best = {}
    for opt, grid in grids.items():
        best[opt] = min((sft(opt, lr, 0) for lr in grid), key=lambda r: r["final_eval_loss"])
        for seed in range(1, a.seeds):
            sft(opt, best[opt]["learning_rate"], seed)
    bc.publish(a, SECTION, report(results, best, grids, setting, base_em, a, command))


def report(results: bc.Results, best: dict[str, dict[str, Any]], grids: dict[str, list[float]], setting: str,
           base_em: float | None, a: argparse.Namespace, command: str) -> str:
    def seeds(opt: str) -> list[dict[str, Any]]:
        b = best[opt]
        return [r for r in results.runs if r.get("setting") == setting and r["optimizer"] == opt
                and r["learning_rate"] == b["learning_rate"] and r["steps"] == a.steps]

    target = statistics.mean(r["final_eval_loss"] for r in seeds("adamw_torch")) if "adamw_torch" in best else None
    rows = []
    for opt, b in best.items():
        runs = seeds(opt)
        ems = [r["exact_match"] for r in runs]
        steps, some = bc.reach(runs, target) if target is not None else (None, "")
        loss = statistics.mean(r["final_eval_loss"] for r in runs)
        rows.append([OPTIMIZERS[opt][0], f"{b['learning_rate']:g}", f"{loss:.4f}",
                     f"{statistics.mean(ems):.3f} ({', '.join(f'{e:.3f}' for e in ems)})",
                     bc.fmt(steps, ".0f", "not reached") + some])
    lines = [*bc.head(SECTION, results.meta, command, results.runs, f"results/{a.results.name}",
                      f"; the base before LoRA: exact match {bc.fmt(base_em, '.3f')}"),
             *bc.md_table(["optimizer", "best lr", "held-out loss, mean over seeds", "exact match, mean (per seed)",
                           "steps to AdamW's final held-out loss"], "lrrlr", rows),
             "", "All sweep points (seed 0), lr: held-out loss / exact match:", ""]
    for opt, grid in grids.items():
        pts = [r for r in results.runs if r.get("setting") == setting and r["optimizer"] == opt and r["seed"] == 0
               and r["steps"] == a.steps]
        lines.append(f"- {OPTIMIZERS[opt][0]}: " + ", ".join(f"{r['learning_rate']:g}: {r['final_eval_loss']:.3f} / "
                                                             f"{r['exact_match']:.3f}" for r in
                                                             sorted(pts, key=lambda r: r["learning_rate"])))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
