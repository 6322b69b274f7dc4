"""Sub-batch scaling of BADM (docs/benchmarks.md, "Sub-batch scaling"): S sub-batches x batch size at a fixed token
budget, per_sub_batch (a dual per sub-batch) against fused (the same pieces as gradient accumulation)."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

SECTION = "## Sub-batch scaling: S x batch size at a fixed token budget"


def main(argv: list[str] | None = None) -> None:
    p = bc.parser(__doc__, "scaling")
    p.add_argument("--sub-batches", default="1,2,4,8")
    p.add_argument("--batch-sizes", default="8,16,32")
    p.add_argument("--tokens", type=int, default=300 * 16 * 64, help="training tokens per run (default 307,200)")
    p.add_argument("--lr", type=float, default=3.0, help="BADM lr = 1/sigma")
    p.add_argument("--rho-over-sigma", type=float, default=9.0)
    p.add_argument("--modes", default="per_sub_batch,fused")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"])
    a = p.parse_args(argv)
    command = bc.command_line()
    subs = [int(s) for s in a.sub_batches.split(",")]
    batches = [int(b) for b in a.batch_sizes.split(",")]
    modes = a.modes.split(",")
    num_train, num_eval = 3000, 200
    if a.smoke:
        bc.smoke_paths(a, "scaling")
        subs, batches, a.tokens, num_train, num_eval = [1, 2], [4], 4 * 4 * 64, 100, 20
    bc.setup(a)
    results = bc.Results(a.results)
    tok_dir = bc.benchmark_tokenizer(a.out_dir)
    block = bc.BASE_RECIPE["block_size"]
    # Interleave: each (batch, S) pair runs its modes back to back, so load drift hits both modes alike.
    for b in batches:
        for s in subs:
            if b % s:
                continue
            for mode in modes:
                key = f"{a.size}|B={b}|S={s}|{mode}|lr={a.lr:g}|r={a.rho_over_sigma:g}|tokens={a.tokens}"
                if results.get(key):
                    continue
                steps = max(1, a.tokens // (b * block))
                r = bc.recipe(key, a.out_dir, a.device, steps, {
                    "model_size": a.size, "num_train_examples": num_train, "num_eval_examples": num_eval,
                    "optimizer": "badm", "learning_rate": a.lr, "rho": a.rho_over_sigma / a.lr, "mode": mode,
                    "warmup_steps": max(1, steps // 15), "tokenizer_name_or_path": tok_dir})
                if mode == "per_sub_batch":
                    r.update(per_device_train_batch_size=b, sub_batches_per_micro_batch=s)
                else:
                    r.update(per_device_train_batch_size=b // s, gradient_accumulation_steps=s)
                results.record({"key": key, "size": a.size, "batch": b, "sub_batches": s, "mode": mode, "steps": steps,
                                "tokens": steps * b * block, "learning_rate": a.lr, "rho_over_sigma": a.rho_over_sigma,
                                **bc.train(r)})
    runs = [r for r in results.runs if r["size"] == a.size and r["learning_rate"] == a.lr
            and r["rho_over_sigma"] == a.rho_over_sigma]
    # the report covers every run of this setting in the results file (e.g. fused timed at fewer batch sizes)
    modes = [m for m in ("per_sub_batch", "fused") if any(r["mode"] == m for r in runs)]
    batches = sorted({r["batch"] for r in runs})
    subs = sorted({r["sub_batches"] for r in runs})
    bc.publish(a, SECTION, report(runs, a, command, subs, batches, modes, results.meta))


def report(runs: list[dict[str, Any]], a: argparse.Namespace, command: str, subs: list[int], batches: list[int],
           modes: list[str], meta: dict[str, str]) -> str:
    def cell(b: int, s: int, mode: str, field: str, spec: str, scale: float = 1.0) -> str:
        r = next((r for r in runs if (r["batch"], r["sub_batches"], r["mode"]) == (b, s, mode)), None)
        return bc.fmt(None if r is None or r[field] is None else r[field] * scale, spec)

    lines = bc.head(SECTION, meta, command, runs, "results/scaling.json")
    header = ["batch (sequences)", "steps", *(f"S={s}" for s in subs)]
    for mode in modes:
        for field, spec, title, scale in (("final_eval_loss", ".3f", "final eval loss", 1.0),
                                          ("s_per_step", ".0f", "ms per step", 1e3)):
            rows = [[b, bc.fmt(next((r["steps"] for r in runs if r["batch"] == b), None), "d"),
                     *(cell(b, s, mode, field, spec, scale) for s in subs)] for b in batches]
            lines += [f"**{mode}: {title}**\n", *bc.md_table(header, "r" * len(header), rows), ""]
    path = plot(runs, subs, batches, modes, a.docs.parent / "figures" / "scaling.png")
    lines.append(f"![sub-batch scaling](figures/{path.name})\n")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], subs: list[int], batches: list[int], modes: list[str], path: Path) -> Path:
    fig, axes = bc.figure(2, (11, 4.2))
    for mode, ls in zip(modes, ("-", "--")):
        for b in batches:
            q = sorted((r for r in runs if r["batch"] == b and r["mode"] == mode and r["final_eval_loss"] is not None),
                       key=lambda r: r["sub_batches"])
            for ax, y in zip(axes, ([r["final_eval_loss"] for r in q], [r["s_per_step"] * 1e3 / b for r in q])):
                ax.plot([r["sub_batches"] for r in q], y, ls, marker="o", label=f"{mode}, batch {b}")
    for ax, label in zip(axes, ("held-out loss at fixed tokens", "training ms per step per sequence")):
        ax.set(ylabel=label, xlabel="sub-batches S per step", xscale="log")
        ax.set_xticks(subs, [str(s) for s in subs])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return bc.save_figure(fig, "BADM sub-batch scaling (fixed token budget)", path)


if __name__ == "__main__":
    main()
