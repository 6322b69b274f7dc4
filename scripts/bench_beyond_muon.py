"""Issue 20's search on real corpora: tuned AdamW, Muon and NorMuon against the BADM family's Muon-like settings, in
stages that build on each other (one results file per corpus and size, shared with scripts/bench_real_corpora.sh).

- ``peers``: AdamW's lr grid; Muon's and NorMuon's lr grid at elementwise lr 0.1, then their AdamW lr at the best lr
  (each extended while its best lies on an edge).
- ``badm``: newton_schulz at its shipped defaults; newton_schulz and nsisa with the ``adam`` solve on the tensors
  Muon's peer gives AdamW (at Muon's best AdamW lr), so that a difference from Muon is the matrices'; lr grids.
- ``search`` (the ADMM parts): rho/sigma of newton_schulz 0.05-9 and of nsisa 0.3-9 at their best lr; the authors'
  warm-down; large slots (S = 2 of 8 sequences) without clipping, with the dual scaled by alpha_s or not.
- ``seeds``: seed 1 of every optimizer's best point.

The report is scripts/bench_convergence.py --report-only over the same results (scripts/bench_beyond_muon.sh).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
import bench_convergence as cv  # noqa: E402

PEERS = ("muon", "normuon")
BADM = ("badm_ns_adam", "badm_nsisa_adam")
SEARCH = ("badm_nsisa_adam_sq", "badm_ns_adam_s2", "badm_nsisa_adam_s2", "badm_nsisa_adam_s2_one")
NS_RATIOS = (0.05, 0.3, 3.0, 9.0)
NSISA_RATIOS = (0.3, 3.0, 9.0)
STAGES = ("peers", "badm", "search", "seeds")


def peers(sw: cv.Sweep, size: str, c: str) -> None:
    for lr in (0.001, 0.003, 0.01, 0.03):
        sw.run("adamw_torch", lr, None, 0, size, c)
    sw.widen("adamw_torch", size, c, "learning_rate")
    for o in PEERS:
        for lr in (0.003, 0.01, 0.03):
            sw.run(o, lr, None, 0, size, c, 0.1)
        sw.widen(o, size, c, "learning_rate")
        best = sw.best(o, size, c)
        for elr in (0.03, 0.3):
            sw.run(o, best["learning_rate"], None, 0, size, c, elr)
        sw.widen(o, size, c, "elementwise_lr")


def badm(sw: cv.Sweep, size: str, c: str) -> None:
    sw.run("badm_ns_norm", 0.03, cv.FIXED_RATIO["badm_ns_norm"], 0, size, c, 0.1)  # the shipped defaults
    elr = sw.best("muon", size, c)["elementwise_lr"]
    for o in BADM:
        for lr in cv.GRIDS[o]:
            sw.run(o, lr, cv.FIXED_RATIO[o], 0, size, c, elr)
        sw.widen(o, size, c, "learning_rate")


def search(sw: cv.Sweep, size: str, c: str) -> None:
    for o, ratios in (("badm_ns_adam", NS_RATIOS), ("badm_nsisa_adam", NSISA_RATIOS)):
        best = sw.best(o, size, c)
        for r in ratios:
            sw.run(o, best["learning_rate"], r, 0, size, c, best["elementwise_lr"])
    elr = sw.best("muon", size, c)["elementwise_lr"]
    for o in SEARCH:
        for lr in cv.GRIDS[o]:
            sw.run(o, lr, cv.FIXED_RATIO[o], 0, size, c, elr)


def seeds(sw: cv.Sweep, size: str, c: str) -> None:
    for o in sorted({r["optimizer"] for r in sw.results.runs if (r["size"], r["corpus"]) == (size, c)}):
        b = sw.best(o, size, c)
        if b is not None:
            sw.run(o, b["learning_rate"], b["rho_over_sigma"], 1, size, c, b.get("elementwise_lr"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", action="append", required=True, choices=sorted(bc.GATHERED))
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    p.add_argument("--char", action="store_true", help="byte-level tokens (no merges)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in order: " + ",".join(STAGES))
    p.add_argument("--out-dir", type=Path, default=Path("outputs/bench-realcorpora"))
    p.add_argument("--results", type=Path, default=bc.RESULTS / "real-corpora")
    p.add_argument("--extend", type=int, default=1)
    a = p.parse_args(argv)
    a.steps, a.device, a.fixed, a.elementwise_lr = {"tiny": 300, "small": 150}, "cpu", [], None
    a.optimizers, a.threads = list(cv.LABELS), 1
    bc.setup(a)
    base = {**bc.BASE_RECIPE, "num_train_examples": 3000, "num_eval_examples": 100}
    corpora = cv.corpora_of([bc.corpus(n, a.out_dir) for n in a.corpus], a.out_dir, a.char)
    sw = cv.Sweep(a, bc.Results.merged([]), base, corpora)
    stages = {"peers": peers, "badm": badm, "search": search, "seeds": seeds}
    for size in a.sizes:
        for c in corpora:
            sw.results = bc.Results(a.results / f"{c}-{size}.json")
            for stage in a.stages.split(","):
                stages[stage](sw, size, c)


if __name__ == "__main__":
    main()
