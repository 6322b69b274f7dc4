"""Newton-Schulz work split across data-parallel ranks (``hf_badm.parallel.ParallelOrthogonaliser``): one fused
``newton_schulz`` optimizer step on 1 and on 2 CPU processes (gloo), side by side in one run.

Each rank holds the same GPT-2-style parameters and the same (reduced) gradients, as DDP gives them; the step is
timed (median of interleaved repetitions after warm-up, the ranks synchronised before each) and its matmul FLOPs
counted per rank (torch's FLOP counter). 1 rank runs once with 1 thread and once with 2 (this machine's 2 cores);
2 ranks run with 1 thread each.

    .venv/bin/python scripts/bench_ns_ranks.py                    # ~25M parameters, writes docs/ (results, section)
    .venv/bin/python scripts/bench_ns_ranks.py --params-millions 2 --reps 3 --out /tmp/x   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
from bench_step import gpt2_like_shapes, make_params, newton_schulz_badm  # noqa: E402

SECTION = "## Newton-Schulz across ranks: the work split of fused newton_schulz"
ROOT = Path(__file__).resolve().parents[1]


def worker(a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.utils.flop_counter import FlopCounterMode

    from hf_badm.parallel import prepare_for_ranks

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(a.threads)
    params = make_params(gpt2_like_shapes(a.params_millions), seed=0)
    opt = newton_schulz_badm(params)
    prepare_for_ranks(opt, world)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in params]

    def step() -> None:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()

    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.reps):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    with FlopCounterMode(display=False) as mode:
        step()
    rank = dist.get_rank() if world > 1 else 0
    row = {"world": world, "rank": rank, "threads": a.threads, "median_ms": 1e3 * statistics.median(times),
           "min_ms": 1e3 * min(times), "flops": mode.get_total_flops(),
           "params": sum(p.numel() for p in params)}
    Path(a.out, f"w{world}-t{a.threads}-r{rank}.json").write_text(json.dumps(row))
    if world > 1:  # no rank drops its communicator while another still talks to it (gloo aborts)
        dist.barrier()
        dist.destroy_process_group()


def launch(a: argparse.Namespace, world: int, threads: int, out: Path) -> None:
    args = ["--worker", "--out", str(out), "--threads", str(threads), "--params-millions", str(a.params_millions),
            "--reps", str(a.reps), "--warmup", str(a.warmup)]
    if world == 1:
        cmd = [sys.executable, __file__, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), __file__,
               *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--params-millions", type=float, default=25.0)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None, help="results folder (default: docs/results, and the section in docs/)")
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return
    bc.quiet()
    with tempfile.TemporaryDirectory() as tmp:
        for world, threads in ((1, 1), (1, 2), (2, 1)):
            launch(a, world, threads, Path(tmp))
        rows = [json.loads(f.read_text()) for f in sorted(Path(tmp).glob("*.json"))]
    one = next(r for r in rows if r["world"] == 1 and r["threads"] == 1)
    lines = ["| ranks x threads | rank | step median ms | step min ms | matmul GFLOP on this rank | FLOPs / 1 rank |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["world"], r["threads"], r["rank"])):
        lines.append(f"| {r['world']} x {r['threads']} | {r['rank']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | "
                     f"{r['flops'] / 1e9:.2f} | {r['flops'] / one['flops']:.2f}x |")
    table = "\n".join(lines)
    meta = bc.machine()
    text = (f"{SECTION}\n\nOne fused `newton_schulz` step (normalized on the elementwise tensors) of a GPT-2-style stack "
            f"of {one['params'] / 1e6:.1f}M parameters, the same gradients on every rank (as DDP's all-reduce leaves "
            "them): with 2 ranks each matrix is orthogonalised on one rank (largest first onto the least-loaded rank) "
            f"and one all_gather brings the directions to both. Median of {a.reps} steps after {a.warmup} warm-up "
            "steps, ranks synchronised before each.\n\n" + table + "\n\n"
            + bc.stamp(meta, bc.command_line()))
    print(text)
    out = Path(a.out) if a.out else ROOT / "docs" / "results"
    bc.write_json(out / "ns_ranks.json", {"machine": meta, "rows": rows})
    if a.out is None:
        bc.write_section(ROOT / "docs" / "benchmarks.md", SECTION, text)


if __name__ == "__main__":
    main()
