"""Newton-Schulz across ranks (docs/benchmarks.md, "Newton-Schulz across ranks"; docs/distributed.md): one fused
newton_schulz step on 1 and 2 gloo ranks, its time and matmul FLOPs per rank (DDP's work split); ``--sharded``: the
bytes each rank's collectives move under DeepSpeed ZeRO-3 and FSDP2 at 2 and 4 ranks (tests/dist_worker.py's jobs)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

SECTION = "## Newton-Schulz across ranks: the work split of fused newton_schulz"
ROOT, TESTS = bc.ROOT, bc.ROOT / "tests"


def worker(a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.utils.flop_counter import FlopCounterMode

    from hf_badm.parallel import prepare_for_ranks

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(a.threads)
    params = bc.make_params(bc.gpt2_like_shapes(a.params_millions), seed=0)
    opt = bc.newton_schulz_badm(params)
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
        times.append(bc.timed(step))
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


def sharded(out_dir: Path) -> None:
    """ZeRO-3 (the model built after the arguments, partitioned as made) and FSDP2 at 2 and 4 ranks: per rank the bytes
    collectives materialise inside BADM.step against its own fp32 Newton-Schulz share, and (ZeRO-3) its NS FLOPs
    against 1 rank's."""
    import torch

    sys.path.insert(0, str(TESTS))
    from dist_worker import run_job
    from procs import launch_env, run_process_group

    jobs = [{"name": "zero3", "mode": "fused", "ga": 1, "steps": 6, "preconditioner": "newton_schulz", "meter": True,
             "deepspeed": json.loads((ROOT / "recipes" / "launch" / "zero3.json").read_text()), "build": "from_config"},
            {"name": "fsdp2", "fsdp2": True, "steps": 6, "preconditioner": "newton_schulz", "meter": True}]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run_job(Path(tmp) / "one", {**jobs[0], "deepspeed": None, "ga": 4, "meter": False, "build": "before"})
        one = torch.load(Path(tmp) / "one" / "zero3" / "rank0.pt", weights_only=True)["ns_flops"]
        for world in (2, 4):
            out = Path(tmp) / f"w{world}"
            code, log = run_process_group([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                           "--nproc_per_node", str(world), str(TESTS / "dist_worker.py"), str(out),
                                           json.dumps(jobs)], 900, cwd=TESTS, env=launch_env(OMP_NUM_THREADS="1"))
            if code:
                raise SystemExit(log[-4000:])
            for engine, rank in ((e, r) for e in ("zero3", "fsdp2") for r in range(world)):
                r = torch.load(out / engine / f"rank{rank}.pt", weights_only=True)
                flops = statistics.mean(r["ns_flops"]) / statistics.mean(one) if "ns_flops" in r else None
                rows.append({"engine": engine, "world": world, "rank": rank, "bytes": r["comm"][-1][0],
                             "own_fp32_ns_share": r["comm"][-1][1], "ratio": round(max(b / s for b, s in r["comm"]), 3),
                             "ns_flops_vs_one_rank": None if flops is None else round(flops, 3)})
    print("\n".join(bc.md_table(["engine", "ranks", "rank", "bytes in BADM.step's collectives", "own fp32 NS share",
                                 "ratio", "NS FLOPs / 1 rank"], "lllllll",
                                [[r["engine"], r["world"], r["rank"], f"{r['bytes']:,}", f"{r['own_fp32_ns_share']:,}",
                                  f"{r['ratio']:.2f}", bc.fmt(r["ns_flops_vs_one_rank"], ".2f")] for r in rows])))
    bc.write_json(out_dir / "ns_sharded.json", {"model": "tiny GPT-2 (2 x 32, 8 hidden matrices)", "rows": rows})


def main(argv: list[str] | None = None) -> None:
    p = bc.parser(__doc__)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--params-millions", type=float, default=25.0)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None, help="results folder (default: docs/results, and the section in docs/)")
    p.add_argument("--sharded", action="store_true", help="ZeRO-3 and FSDP2 at 2 and 4 ranks (ns_sharded.json)")
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return
    bc.quiet()
    if a.sharded:
        return sharded(Path(a.out) if a.out else bc.RESULTS)
    with tempfile.TemporaryDirectory() as tmp:
        for world, threads in ((1, 1), (1, 2), (2, 1)):
            launch(a, world, threads, Path(tmp))
        rows = [json.loads(f.read_text()) for f in sorted(Path(tmp).glob("*.json"))]
    one = next(r for r in rows if r["world"] == 1 and r["threads"] == 1)
    table = bc.md_table(["ranks x threads", "rank", "step median ms", "step min ms", "matmul GFLOP on this rank",
                         "FLOPs / 1 rank"], "lrrrrr", [
        [f"{r['world']} x {r['threads']}", r["rank"], f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}",
         f"{r['flops'] / 1e9:.2f}", f"{r['flops'] / one['flops']:.2f}x"]
        for r in sorted(rows, key=lambda r: (r["world"], r["threads"], r["rank"]))])
    meta = bc.machine()
    bc.write_json(Path(a.out or bc.RESULTS) / "ns_ranks.json", {"machine": meta, "rows": rows})
    a.docs, a.no_write = bc.DOCS, a.out is not None
    bc.publish(a, SECTION, "\n".join([SECTION, "", *table, "", bc.stamp(meta, bc.command_line())]))

if __name__ == "__main__":
    main()
