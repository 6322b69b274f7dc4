"""What the second_moment preconditioner's v should track: the gradient g (the library's choice, so v is
Adam's second moment) or the local solve's numerator g + pi (the prototype of ../shared/BADM.md §6).

Tiny GPT-2 pre-training on the built-in corpus with the convergence benchmark's recipe and tokenizer (300
steps, batch 16 x 64, cosine, warm-up 20, clip 1.0, 100 held-out documents), fused mode, rho = 6000 sigma; lr = 1/sigma in {3, 10, 30}
at seed 0 for both targets, then each target's best lr at seeds 0 and 1. Prints one line per run and
the mean per target. Usage: python scripts/probe_second_moment_target.py [--steps N] [--smoke]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

import hf_badm.optim.badm as badm_module  # noqa: E402
from hf_badm.optim.preconditioned import fused_second_moment  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lrs", default="3,10,30")
    p.add_argument("--out-dir", type=Path, default=bc.ROOT / "outputs" / "probe-second-moment-target")
    p.add_argument("--smoke", action="store_true", help="seconds-long check: a few steps, one lr")
    a = p.parse_args(argv)
    if a.smoke:
        a.steps, a.lrs = 4, "10"
    bc.quiet()
    import torch

    torch.set_num_threads(1)
    lrs = [float(x) for x in a.lrs.split(",")]
    tok_dir = bc.benchmark_tokenizer(a.out_dir)  # the convergence benchmark's tokenizer and held-out size
    base = {**bc.BASE_RECIPE, "model_size": "tiny", "max_steps": a.steps, "eval_steps": max(1, a.steps // 10),
            "num_eval_examples": 100, "tokenizer_name_or_path": tok_dir, "optimizer": "badm",
            "preconditioner": "second_moment"}
    finals: dict[tuple[str, float, int], float] = {}

    def run(target: str, lr: float, seed: int) -> float:
        if (target, lr, seed) not in finals:
            badm_module.fused_second_moment = functools.partial(fused_second_moment, track_dual=target == "g + pi")
            out = a.out_dir / f"{target.replace(' ', '')}-lr{lr:g}-seed{seed}"
            summary = bc.train({**base, "learning_rate": lr, "rho": 6000.0 / lr, "seed": seed, "output_dir": str(out)})
            finals[(target, lr, seed)] = summary["final_eval_loss"]
            print(f"v tracks {target:<6} lr {lr:<4g} seed {seed}: eval {summary['final_eval_loss']:.4f}", flush=True)
        return finals[(target, lr, seed)]

    for target in ("g", "g + pi"):
        best = min(lrs, key=lambda lr: run(target, lr, 0))
        losses = [run(target, best, seed) for seed in (0, 1)]
        print(f"== v tracks {target}: best lr {best:g}, final eval loss mean {statistics.mean(losses):.4f} "
              f"(seeds {', '.join(f'{x:.4f}' for x in losses)})", flush=True)
    badm_module.fused_second_moment = fused_second_moment


if __name__ == "__main__":
    main()
