"""End-to-end Trainer throughput and memory (docs/benchmarks.md, "Throughput and memory"): `hf-badm train` in a fresh
process per run, every optimizer step timed, optimizers round-robin over rounds (medians reported)."""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
from hf_badm.app.learning_rates import COMPARE_LEARNING_RATES  # noqa: E402

SECTION = "## Throughput and memory: end-to-end Trainer steps"
# (table row, `hf-badm compare` name whose learning rate it runs at (hf_badm.app.learning_rates), recipe settings);
# plain BADM at rho/sigma 9, newton_schulz at its default rho = sigma.
PLAIN_BADM = {"optimizer": "badm", "rho": 3.0}
OPTIMIZERS = {"badm": ("BADM fused", "badm", PLAIN_BADM),
              "badm_s4": ("BADM per-sub-batch (S=4)", "badm", {**PLAIN_BADM, "mode": "per_sub_batch",
                                                               "sub_batches_per_micro_batch": 4}),
              "badm_ns": ("BADM newton_schulz (normalized elsewhere)", "badm-newton_schulz",
                          {"optimizer": "badm", "preconditioner": "newton_schulz"}),
              "adamw_torch": ("AdamW (torch, foreach)", "adamw_torch", {"optimizer": "adamw_torch"}),
              "sgd": ("SGD+momentum 0.9", "sgd", {"optimizer": "sgd", "optim_args": "momentum=0.9"}),
              "muon": ("Muon (+ AdamW elsewhere)", "muon", {"optimizer": "muon"})}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run in this process with every optimizer step timed (torch's global step hooks)."""
    import torch

    torch.set_num_threads(spec.pop("threads"))
    with bc.StepTimer() as timer:
        summary = bc.train(spec)
    opt_s = timer.seconds[2:] or timer.seconds  # the first steps allocate state
    opt_ms = statistics.median(opt_s) * 1e3
    params = sum(p.numel() for g in timer.optimizer.param_groups for p in g["params"])
    return {"tokens_per_second": summary["tokens_per_second"], "s_per_step": summary["s_per_step"],
            "opt_ms_per_step": opt_ms, "opt_share": opt_ms / 1e3 / summary["s_per_step"],
            "state_mib": bc.state_bytes(timer.optimizer) / 2**20, "params": params,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "load_1min": summary["load_1min"]}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if bc.worker(argv, worker):
        return
    p = bc.parser(__doc__, "throughput")
    p.add_argument("--sizes", default="tiny,small")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    command = bc.command_line()
    sizes, opts = a.sizes.split(","), a.optimizers.split(",")
    num_train = 3000
    if a.smoke:
        bc.smoke_paths(a, "throughput")
        sizes, opts, a.steps, a.rounds, num_train = ["tiny"], ["badm", "adamw_torch"], 4, 1, 100
    bc.setup(a)
    tok_dir = bc.benchmark_tokenizer(a.out_dir)
    results = bc.Results(a.results)
    for rnd, (size, o) in bc.rotations([(size, o) for size in sizes for o in opts], a.rounds):
        key = f"{size}|{o}|round={rnd}|steps={a.steps}|{a.device}"
        if results.get(key):
            continue
        spec = bc.recipe(key, a.out_dir, a.device, a.steps, {
            "model_size": size, "num_train_examples": num_train, "num_eval_examples": 20, "eval_strategy": "no",
            "learning_rate": COMPARE_LEARNING_RATES[OPTIMIZERS[o][1]], "tokenizer_name_or_path": tok_dir,
            "threads": a.threads, **OPTIMIZERS[o][2]})
        done = bc.in_subprocess(__file__, spec, a.out_dir, key)
        if "error" in done:
            raise SystemExit(f"{key} failed:\n{done['error']}")
        entry = {"key": key, "size": size, "optimizer": o, "round": rnd, "steps": a.steps, "device": a.device, **done}
        results.add(entry)
        print(f"{key}: {entry['tokens_per_second']:,.0f} tok/s, optimizer {entry['opt_ms_per_step']:.1f} ms/step "
              f"({entry['opt_share']:.1%}), load {entry['load_1min']:.1f}", flush=True)
    bc.publish(a, SECTION, report(results, sizes, opts, a, command))


def medians(runs: list[dict[str, Any]], size: str, opts: list[str], steps: int, device: str) -> dict[str, dict]:
    """Per optimizer of ``opts`` (those with runs), the median of each measure over its rounds at ``size``."""
    med: dict[str, dict[str, float]] = {}
    for o in opts:
        mine = [r for r in runs if r["size"] == size and r["optimizer"] == o and r["steps"] == steps
                and r.get("device") == device]
        if mine:
            med[o] = {k: statistics.median(r[k] for r in mine) for k in
                      ("tokens_per_second", "s_per_step", "opt_ms_per_step", "opt_share", "state_mib", "peak_rss_mb")}
            med[o]["params"] = mine[0]["params"]
    return med


def report(results: bc.Results, sizes: list[str], opts: list[str], a: argparse.Namespace, command: str) -> str:
    rows = []
    for size in sizes:
        med = medians(results.runs, size, opts, a.steps, a.device)
        ref = med.get("adamw_torch", {}).get("tokens_per_second")
        rows += [[f"{size} ({m['params'] / 1e6:.2f}M)", OPTIMIZERS[o][0], f"{m['tokens_per_second']:,.0f}",
                  f"{bc.fmt(ref and m['tokens_per_second'] / ref, '.2f')}x", f"{m['s_per_step'] * 1e3:.0f}",
                  f"{m['opt_ms_per_step']:.1f}", f"{m['opt_share']:.1%}", f"{m['state_mib']:.2f}",
                  f"{m['peak_rss_mb']:,.0f}"] for o, m in med.items()]
    return "\n".join([*bc.head(SECTION, results.meta, command, results.runs, "results/throughput.json"), *bc.md_table(
        ["model", "optimizer", "tokens/s", "vs AdamW", "step ms", "optimizer ms/step", "optimizer share", "state MiB",
         "peak RSS MB"], "llrrrrrrr", rows)]) + "\n"


if __name__ == "__main__":
    main()
