"""Newton-Schulz on sharded engines: what one fused ``newton_schulz`` step costs each rank under DeepSpeed ZeRO-3 (the
model built after the arguments, partitioned as it is made) and FSDP2, at 2 and 4 CPU ranks.

Per rank and step: the bytes that collectives materialise inside ``BADM.step`` (every tensor a collective reads or
writes, each storage once: the meter of tests/dist_worker.py), the rank's own fp32 share of the Newton-Schulz
tensors, their ratio, and (ZeRO-3, through the Trainer) the rank's Newton-Schulz matmul FLOPs against the 1-rank run.
The runs are the jobs tests/test_distributed.py checks for equality with 1 rank.

    .venv/bin/python scripts/bench_ns_sharded.py                  # writes docs/results/ns_sharded.json
    .venv/bin/python scripts/bench_ns_sharded.py --out /tmp/x     # elsewhere
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))


def jobs() -> list[dict]:
    config = json.loads((ROOT / "recipes" / "launch" / "zero3.json").read_text())
    return [{"name": "zero3", "mode": "fused", "ga": 1, "steps": 6, "deepspeed": config, "preconditioner": "newton_schulz",
             "build": "from_config", "meter": True},
            {"name": "fsdp2", "fsdp2": True, "steps": 6, "preconditioner": "newton_schulz", "meter": True}]


def main() -> None:
    import torch

    from procs import launch_env, run_process_group

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    a = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        one = Path(tmp) / "one"
        from dist_worker import run_job

        run_job(one, {**jobs()[0], "name": "zero3", "deepspeed": None, "ga": 4, "meter": False,
                      "build": "before"})  # the 1-rank Newton-Schulz FLOPs per step
        single_flops = torch.load(one / "zero3" / "rank0.pt", weights_only=True)["ns_flops"]
        for world in (2, 4):
            out = Path(tmp) / f"w{world}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                   str(TESTS / "dist_worker.py"), str(out), json.dumps(jobs())]
            code, log = run_process_group(cmd, 900, cwd=TESTS, env=launch_env(OMP_NUM_THREADS="1"))
            if code:
                raise SystemExit(log[-4000:])
            for engine in ("zero3", "fsdp2"):
                for rank in range(world):
                    r = torch.load(out / engine / f"rank{rank}.pt", weights_only=True)
                    ratio = max(b / share for b, share in r["comm"])
                    flops = (sum(r["ns_flops"]) / len(r["ns_flops"]) / (sum(single_flops) / len(single_flops))
                             if "ns_flops" in r else None)
                    rows.append({"engine": engine, "world": world, "rank": rank, "bytes": r["comm"][-1][0],
                                 "own_fp32_ns_share": r["comm"][-1][1], "ratio": round(ratio, 3),
                                 "ns_flops_vs_one_rank": None if flops is None else round(flops, 3)})
    print("| engine | ranks | rank | bytes in BADM.step's collectives | own fp32 NS share | ratio | NS FLOPs / 1 rank |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        flops = "–" if r["ns_flops_vs_one_rank"] is None else f"{r['ns_flops_vs_one_rank']:.2f}"
        print(f"| {r['engine']} | {r['world']} | {r['rank']} | {r['bytes']:,} | {r['own_fp32_ns_share']:,} | "
              f"{r['ratio']:.2f} | {flops} |")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ns_sharded.json").write_text(json.dumps({"model": "tiny GPT-2 (2 x 32, 8 hidden matrices)",
                                                       "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
