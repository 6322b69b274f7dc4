"""LoRA instruction tuning of a pre-trained tiny GPT-2 on the built-in tasks: exact match, BADM vs AdamW.

First a base model is pre-trained once (``hf-badm train``, AdamW, built-in corpus); then LoRA
adapters (all linear layers, r 8) are trained with TRL's SFTTrainer on the built-in instruction
tasks (arithmetic, copy, reverse, lookup, sort) for a fixed budget, with BADM and with AdamW, each
over the same-sized log-spaced learning-rate grid; the best point (held-out loss) is re-run with a
second seed. Reported: held-out loss and exact-match accuracy of greedy completions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

SECTION = "## Instruction tuning: LoRA SFT exact match"
GRIDS = {"badm": [1.0, 3.0, 10.0, 30.0], "adamw_torch": [1e-3, 3e-3, 1e-2, 3e-2]}
LABELS = {"badm": "BADM fused", "adamw_torch": "AdamW"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", choices=["tiny", "small"])
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=300, help="LoRA SFT steps (batch 16)")
    p.add_argument("--rho-over-sigma", type=float, default=9.0, help="BADM rho/sigma")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--examples", type=int, default=128, help="held-out prompts scored by exact match")
    bc.add_run_args(p, "sft")
    a = p.parse_args(argv)
    command = bc.command_line()
    grids = dict(GRIDS)
    num_train, num_eval = 3000, 200
    if a.smoke:
        bc.smoke_paths(a, "sft")
        a.pretrain_steps, a.steps, a.examples, a.seeds, num_train, num_eval = 4, 4, 4, 1, 100, 20
        grids = {k: v[1:2] for k, v in GRIDS.items()}
    bc.setup(a)
    results = bc.Results(a.results)
    base_dir = a.out_dir / f"base-{a.size}-{a.pretrain_steps}"
    if not (base_dir / "metrics.json").exists():
        bc.train({**bc.BASE_RECIPE, "model_size": a.size, "optimizer": "adamw_torch", "learning_rate": 3e-3,
                  "num_train_examples": num_train, "num_eval_examples": num_eval, "max_steps": a.pretrain_steps,
                  "eval_strategy": "no", "output_dir": str(base_dir), **bc.device_recipe(a.device)})

    def sft(opt: str, lr: float, seed: int) -> dict[str, Any]:
        key = f"{a.size}|{opt}|lr={lr:g}|seed={seed}|steps={a.steps}"
        done = results.get(key)
        if done:
            return done
        r: dict[str, Any] = {
            "task": "lora-sft", "model_name_or_path": str(base_dir), "dataset": "builtin", "num_train_examples": 4000,
            "num_eval_examples": 200, "lora_r": 8, "lora_alpha": 16, "per_device_train_batch_size": 16,
            "per_device_eval_batch_size": 64, "max_length": 64, "bf16": False, "gradient_checkpointing": False,
            "max_steps": a.steps, "learning_rate": lr, "lr_scheduler_type": "cosine", "warmup_steps": 10,
            "max_grad_norm": 1.0, "logging_steps": 10, "eval_strategy": "no", "exact_match_examples": a.examples,
            "report_to": "none", "save_strategy": "no", "disable_tqdm": True, "seed": seed, "optimizer": opt,
            **bc.device_recipe(a.device),
            "output_dir": str(a.out_dir / "runs" / key.replace("|", "_").replace("=", ""))}
        if opt == "badm":
            r["rho"] = a.rho_over_sigma / lr
        summary = bc.train(r)
        entry = {"key": key, "size": a.size, "optimizer": opt, "learning_rate": lr, "seed": seed, "steps": a.steps,
                 **summary}
        results.add(entry)
        print(f"{key}: eval {bc.fmt(entry['final_eval_loss'], '.4f')} exact match {bc.fmt(entry['exact_match'], '.3f')}",
              flush=True)
        return entry

    for i in range(max(len(g) for g in grids.values())):  # interleaved across optimizers
        for opt, grid in grids.items():
            if i < len(grid):
                sft(opt, grid[i], 0)
    best = {}
    for opt, grid in grids.items():
        pts = [results.get(f"{a.size}|{opt}|lr={lr:g}|seed=0|steps={a.steps}") for lr in grid]
        best[opt] = min(pts, key=lambda r: r["final_eval_loss"])
        for seed in range(1, a.seeds):
            sft(opt, best[opt]["learning_rate"], seed)
    lines = [f"{SECTION}\n",
             f"A GPT-2 {a.size} pre-trained with `hf-badm train` (AdamW 3e-3, {a.pretrain_steps} steps on the built-in "
             f"corpus), then LoRA adapters (r 8, alpha 16, all linear layers) trained with TRL's SFTTrainer for "
             f"{a.steps} steps of 16 prompt-completion pairs (completion-only loss) on the built-in tasks (add, sub, "
             "mul, copy, reverse, lookup, sort), cosine schedule, 10 warm-up steps, clipping 1.0. Each optimizer "
             f"sweeps 4 half-decade learning rates (BADM rho/sigma {a.rho_over_sigma:g}); the best by held-out loss "
             f"is re-run to {a.seeds} seeds. Exact match: greedy completions of {a.examples} held-out prompts.\n",
             bc.stamp(results.meta, command, [r["load_1min"] for r in results.runs]),
             "- every run: [`results/sft.json`](results/sft.json)\n",
             "| optimizer | best lr | held-out loss, mean over seeds | exact match, mean (per seed) |",
             "|---|---:|---:|---|"]
    for opt, b in best.items():
        runs = [r for r in results.runs if r["optimizer"] == opt and r["learning_rate"] == b["learning_rate"]
                and r["steps"] == a.steps]
        ems = [r["exact_match"] for r in runs]
        lines.append(f"| {LABELS[opt]} | {b['learning_rate']:g} | "
                     f"{statistics.mean(r['final_eval_loss'] for r in runs):.4f} | {statistics.mean(ems):.3f} "
                     f"({', '.join(f'{e:.3f}' for e in ems)}) |")
    lines += ["", "All sweep points (seed 0), lr: held-out loss / exact match:", ""]
    for opt, grid in grids.items():
        pts = [results.get(f"{a.size}|{opt}|lr={lr:g}|seed=0|steps={a.steps}") for lr in grid]
        lines.append(f"- {LABELS[opt]}: " + ", ".join(f"{r['learning_rate']:g}: {r['final_eval_loss']:.3f} / "
                                                      f"{r['exact_match']:.3f}" for r in pts))
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_write:
        bc.write_section(a.docs, SECTION, text)


if __name__ == "__main__":
    main()
