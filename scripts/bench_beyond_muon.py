"""Issue 20's search on real corpora (docs/benchmarks.md, "Real corpora: BADM beyond Muon"): tuned AdamW, Muon and
NorMuon against the BADM family's Muon-like settings, in stages that build on each other (one results file per corpus
and size; bench_beyond_muon.sh runs them all); ``--report`` writes the section from the recorded runs alone."""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
import bench_convergence as cv  # noqa: E402

PEERS = ("muon", "normuon")
BADM = ("badm_ns_adam", "badm_nsisa_adam")
SEARCH = ("badm_nsisa_adam_sq", "badm_ns_adam_s2", "badm_nsisa_adam_s2", "badm_nsisa_adam_s2_one")
NS_RATIOS = (0.05, 0.3, 1.25, 3.0, 9.0)
NSISA_RATIOS = (0.3, 3.0, 9.0)
CROSS = ("badm_nsisa", "badm_normuon", "badm_ns_norm_pe", "badm_ns_norm_rms")
SPLIT = ("muon_split", "muon_whole", "badm_ns_norm_parts", "badm_ns_norm_whole", "badm_ns_norm_heads")
STAGES = ("peers", "badm", "search", "cross", "seeds", "split")
SECTION = "## Real corpora: BADM beyond Muon"
CORPORA = ("stdlib_docs", "debian_changelogs", "licenses")
SETTINGS = (("BPE", "tiny"), ("BPE", "small"), ("byte-level", "tiny"), ("byte-level", "small"))
ROWS = ("adamw_torch", "muon", "normuon", "muon_qhadam", "muon_qhadam_b8", "badm_ns_norm", "badm_ns_norm_e4",
        "badm_ns_norm_e19", "badm_ns_norm_pe", "badm_ns_norm_rms", "badm_normuon", "badm_ns_adam", "badm_nsisa",
        "badm_nsisa_adam", *SEARCH)
# The ablation on the BPE tiny runs: (label, optimizer, rho/sigma, lr; None: the optimizer's best seed-0 point's).
ABLATION = (("Muon (torch; AdamW elsewhere), tuned", "muon", None, None),
            ("BADM newton_schulz, adam elsewhere, rho = sigma (Muon's step, float32 Newton-Schulz)", "badm_ns_adam",
             1.0, None),
            ("+ rho = 1.25 sigma: BADM's dual as a look-back over the directions (scalar gain)", "badm_ns_adam", 1.25, None),
            ("+ the gain from |d + pi| (the authors' NSISA, rho = 1.25 sigma)", "badm_nsisa_adam", 1.25, None),
            ("NSISA, its best rho/sigma", "badm_nsisa_adam", None, None),
            ("NSISA + the authors' warm-down sigma_t = sigma / f_t^2", "badm_nsisa_adam_sq", None, None),
            ("NSISA, 2 slots of 8 sequences, no clipping, gamma = alpha (the authors' code)", "badm_nsisa_adam_s2",
             None, None),
            ("NSISA, 2 slots, no clipping, gamma = 1 (the paper's algorithm)", "badm_nsisa_adam_s2_one", None, None),
            ("newton_schulz, 2 slots, no clipping (per-slot momentum, averaged polar factors)", "badm_ns_adam_s2", None, None),
            ("NSISA with normalized (not adam) elsewhere", "badm_nsisa", None, None),
            ("newton_schulz, normalized elsewhere (QH momentum over RMS-normalised gradients)", "badm_ns_norm", None, None),
            ("Muon with QHAdam (nu 8/9) elsewhere, the peer of the row above", "muon_qhadam", None, None),
            ("newton_schulz, normalized elsewhere at rho/sigma 4 (beta 0.8, nu 3/4)", "badm_ns_norm_e4", None, None),
            ("Muon with QHAdam (beta1 0.8, nu 3/4) elsewhere, the peer of the row above", "muon_qhadam_b8", None, None),
            ("newton_schulz at the shipped defaults (lr 0.03, normalized elsewhere at 0.1)", "badm_ns_norm", 1.0, 0.03),
            ("newton_schulz with Polar Express coefficients, normalized elsewhere", "badm_ns_norm_pe", None, None),
            ("newton_schulz with the match_rms_adamw lr scale, normalized elsewhere", "badm_ns_norm_rms", None, None),
            ("normuon (NorMuon's row normalisation after NS), normalized elsewhere", "badm_normuon", None, None))


def peers(sw: cv.Sweep, size: str, c: str) -> None:
    """AdamW's lr grid; Muon's and NorMuon's lr at elementwise lr 0.1, then their AdamW lr (edges extended)."""
    lean = sw.args.lean
    for lr in (0.003, 0.01) if lean else (0.001, 0.003, 0.01, 0.03):
        sw.run("adamw_torch", lr, None, 0, size, c)
    sw.widen("adamw_torch", size, c, "learning_rate")
    for o in PEERS:
        elr = sw.best("muon", size, c)["elementwise_lr"] if lean and o != "muon" else 0.1
        for lr in (0.003, 0.01, 0.03):
            sw.run(o, lr, None, 0, size, c, elr)
        sw.widen(o, size, c, "learning_rate")
        if lean and o != "muon":
            continue
        best = sw.best(o, size, c)
        for elr in (0.03, 0.3):
            sw.run(o, best["learning_rate"], None, 0, size, c, elr)
        sw.widen(o, size, c, "elementwise_lr")


def badm(sw: cv.Sweep, size: str, c: str) -> None:
    """newton_schulz at its shipped defaults beside Muon + QHAdam; newton_schulz and nsisa with adam where Muon has
    AdamW (at Muon's AdamW lr), so that a difference from Muon is the matrices'."""
    lean = sw.args.lean
    for lr in (0.03, 0.01):  # the shipped defaults (0.03), and at Muon's usual best; with QHAdam's peer beside it
        sw.run("badm_ns_norm", lr, cv.FIXED_RATIO["badm_ns_norm"], 0, size, c, 0.1)
        if not lean:
            sw.run("muon_qhadam", lr, None, 0, size, c, 0.1)
    muon = sw.best("muon", size, c)
    for o in BADM:
        grid = [muon["learning_rate"]] if lean and o == "badm_ns_adam" else (0.01, 0.03) if lean else cv.GRIDS[o]
        for lr in grid:
            sw.run(o, lr, cv.FIXED_RATIO[o], 0, size, c, muon["elementwise_lr"])
        if not lean:
            sw.widen(o, size, c, "learning_rate")


def search(sw: cv.Sweep, size: str, c: str) -> None:
    """The ADMM parts: rho/sigma at the best lr, the authors' warm-down, large slots without clipping."""
    for o, ratios in (("badm_ns_adam", NS_RATIOS), ("badm_nsisa_adam", NSISA_RATIOS)):
        best = sw.best(o, size, c)
        for r in ratios:
            sw.run(o, best["learning_rate"], r, 0, size, c, best["elementwise_lr"])
    elr = sw.best("muon", size, c)["elementwise_lr"]
    for o in SEARCH:
        for lr in cv.GRIDS[o]:
            sw.run(o, lr, cv.FIXED_RATIO[o], 0, size, c, elr)


def cross(sw: cv.Sweep, size: str, c: str) -> None:
    """At every place what the first stages fixed: normalized's own lr and rho/sigma, Muon + QHAdam's lrs, and the
    directions users pick after Muon (normuon, Polar Express, match_rms_adamw, nsisa) on their lr grids."""
    for lr in (0.01, 0.03):
        for elr in (0.03, 0.3):
            sw.run("badm_ns_norm", lr, cv.FIXED_RATIO["badm_ns_norm"], 0, size, c, elr)
        sw.run("muon_qhadam", lr, None, 0, size, c, 0.1)
    sw.widen("badm_ns_norm", size, c, "elementwise_lr")
    best = sw.best("badm_ns_norm", size, c)
    for o in ("badm_ns_norm_e4", "badm_ns_norm_e19"):  # the normalized solve's own rho/sigma (beta, nu) at that point
        sw.run(o, best["learning_rate"], best["rho_over_sigma"], 0, size, c, best["elementwise_lr"])
    sw.widen("muon_qhadam", size, c, "learning_rate")
    best = sw.best("muon_qhadam", size, c)
    for elr in (0.03, 0.3):
        sw.run("muon_qhadam", best["learning_rate"], None, 0, size, c, elr)
    sw.widen("muon_qhadam", size, c, "elementwise_lr")
    best = sw.best("muon_qhadam", size, c)  # the peer of rho/sigma 4: QHAdam at its beta1 0.8 and nu 3/4
    sw.run("muon_qhadam_b8", best["learning_rate"], None, 0, size, c, best["elementwise_lr"])
    for o in CROSS:
        for lr in cv.GRIDS[o][:2] if o == "badm_nsisa" else cv.GRIDS[o]:
            sw.run(o, lr, cv.FIXED_RATIO[o], 0, size, c, 0.1)
        sw.widen(o, size, c, "learning_rate")


def refine(sw: cv.Sweep, size: str, c: str) -> None:
    """Each candidate's best lr (and the peers' AdamW lr) x 10**(+-1/4): a setting between two grid points of Muon's
    must not win by that; ``--lean``: Muon, newton_schulz (normalized elsewhere) and Muon + QHAdam only."""
    quarter = (10 ** -0.25, 10 ** 0.25)
    todo = ("muon", "badm_ns_norm", "muon_qhadam") if sw.args.lean else (*PEERS, *BADM, *SEARCH, "badm_ns_norm", "muon_qhadam")
    for o in todo:
        best = sw.best(o, size, c)
        if best is None:
            continue
        for f in quarter:
            sw.run(o, float(f"{best['learning_rate'] * f:.3g}"), best["rho_over_sigma"], 0, size, c,
                   best.get("elementwise_lr"))
        if o in PEERS and (o == "muon" or not sw.args.lean):
            best = sw.best(o, size, c)
            for f in quarter:
                sw.run(o, best["learning_rate"], None, 0, size, c, float(f"{best['elementwise_lr'] * f:.3g}"))
    sw.run("muon_qhadam", sw.best("badm_ns_norm", size, c)["learning_rate"], None, 0, size, c, 0.1)


def split(sw: cv.Sweep, size: str, c: str) -> None:
    """Fused projections split into parts, whole or per head, Muon with the split, and torch's Muon again (at the AdamW
    lr the peers stage tuned), each on its lr grid then seed 1, all in ``split/``: every row of that table on one
    machine (runs of one recipe on different CPUs differ by more than these variants do)."""
    elr = sw.best("muon", size, c)["elementwise_lr"]
    main, sw.results = sw.results, bc.Results(sw.results.path.parent / "split" / sw.results.path.name)
    for o in ("muon", *SPLIT):
        for lr in cv.GRIDS[o]:
            sw.run(o, lr, cv.FIXED_RATIO.get(o), 0, size, c, elr if o in PEERS + SPLIT[:2] else 0.1)
        sw.widen(o, size, c, "learning_rate")
        b = sw.best(o, size, c)
        sw.run(o, b["learning_rate"], b["rho_over_sigma"], 1, size, c, b["elementwise_lr"])
    sw.results = main


LEAN_SEEDS = ("adamw_torch", *PEERS, "muon_qhadam", "muon_qhadam_b8", "badm_ns_norm", "badm_ns_norm_e4",
              "badm_ns_norm_e19", *BADM, *CROSS)


def seeds(sw: cv.Sweep, size: str, c: str) -> None:
    refine(sw, size, c)
    done = sorted({r["optimizer"] for r in sw.results.runs if (r["size"], r["corpus"]) == (size, c)})
    for o in (o for o in done if o in LEAN_SEEDS or not sw.args.lean):
        b = sw.best(o, size, c)
        if b is not None:
            sw.run(o, b["learning_rate"], b["rho_over_sigma"], 1, size, c, b.get("elementwise_lr"))


# ----------------------------------------------------------------------------- report

def corpus_key(corpus: str, tokens: str) -> str:
    return corpus + (bc.CHAR_SUFFIX if tokens == "byte-level" else "")


def mean_curve(runs: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The eval curve averaged over seeds (evaluated at the same steps)."""
    return [{"step": pts[0]["step"], "eval_loss": statistics.mean(p["eval_loss"] for p in pts)}
            for pts in zip(*(r["curve"] for r in runs))]


class Report:
    def __init__(self, sw: cv.Sweep) -> None:
        self.sw = sw

    def runs(self, point: dict[str, Any]) -> list[dict[str, Any]]:
        return cv.seeds_of(self.sw.results, point)

    def point(self, o: str, size: str, c: str, ratio: float | None = None,
              lr: float | None = None) -> dict[str, Any] | None:
        """The optimizer's best seed-0 point (at ``ratio`` and ``lr``, if given)."""
        pts = [p for p in self.sw.points(o, size, c) if (ratio is None or p["rho_over_sigma"] == ratio)
               and (lr is None or math.isclose(p["learning_rate"], lr))]
        return min(pts, key=lambda p: p["final_eval_loss"]) if pts else None

    def muon(self, size: str, c: str) -> tuple[float, list[dict[str, float]]] | None:
        """Tuned Muon's mean final loss (the target) and mean curve."""
        best = self.point("muon", size, c)
        if best is None:
            return None
        curve = mean_curve(self.runs(best))
        return curve[-1]["eval_loss"], curve

    def fraction(self, curve: list[dict[str, float]], size: str, c: str) -> float | None:
        """Steps to tuned Muon's final loss / Muon's steps; where never reached, Muon's budget over the steps Muon
        needs for this curve's final loss (above 1: slower than Muon)."""
        ref = self.muon(size, c)
        if ref is None:
            return None
        target, muon_curve = ref
        steps = self.sw.args.steps[size]
        reach = bc.steps_to_reach(curve, target)
        if reach is not None:
            return reach / steps
        theirs = bc.steps_to_reach(muon_curve, curve[-1]["eval_loss"])
        return steps / theirs if theirs else None

    def cell(self, point: dict[str, Any] | None, size: str, c: str, all_seeds: bool = True) -> tuple[str, float | None]:
        if point is None:
            return "–", None
        runs = self.runs(point) if all_seeds else [point]
        curve = mean_curve(runs)
        frac = self.fraction(curve, size, c)
        seeds = f", {len(runs)} seeds" if all_seeds and len(runs) != 2 else ""
        return f"{curve[-1]['eval_loss']:.3f} ({bc.fmt(frac, '.2f')}x{seeds})", frac

    def row(self, pts: list, size: str, keys: list[str], all_seeds: bool = True) -> tuple[list[str], float | None]:
        """A table row's cells (one per place) and the geometric mean of their fractions (None: one is missing)."""
        cells = [self.cell(p, size, k, all_seeds) for p, k in zip(pts, keys)]
        return [t for t, _ in cells], bc.geomean([f for _, f in cells])

    def geomean(self, o: str, tokens: str, size: str) -> float | None:
        """The optimizer's geometric-mean fraction over the corpora at one tokenisation and size."""
        keys = [corpus_key(c, tokens) for c in CORPORA]
        return self.row([self.point(o, size, k) for k in keys], size, keys)[1]

    @staticmethod
    def describe(point: dict[str, Any]) -> str:
        r = point["rho_over_sigma"]
        elr = point.get("elementwise_lr")
        return (f"lr {point['learning_rate']:g}" + (f", r {r:g}" if r is not None else "")
                + (f", elr {elr:g}" if elr else ""))

    def table(self, first: str, rows: list[tuple[str, list]], size: str, keys: list[str], all_seeds: bool = True,
              last: tuple[str, Callable[[list], str]] | None = None) -> list[str]:
        """Markdown lines of ``rows`` (label, its point at each place of ``keys``): a cell per corpus (:meth:`cell`),
        their geometric mean, and ``last`` (header, text of the row's points); rows with no point are left out."""
        lines = []
        for label, pts in rows:
            if any(pts):
                cells, gm = self.row(pts, size, keys, all_seeds)
                lines.append([label, *cells, f"{bc.fmt(gm, '.2f')}x", *([last[1](pts)] if last else [])])
        return bc.md_table([first, *CORPORA, "geometric mean", *([last[0]] if last else [])],
                           "l" + "r" * (len(CORPORA) + 1) + ("l" if last else ""), lines)

    def settings(self, pts: list[dict[str, Any] | None]) -> str:
        """Each corpus's best point (:meth:`describe`), named by the corpus's first word."""
        return "; ".join(f"{k.split('_')[0]}: {self.describe(p)}" for p, k in zip(pts, CORPORA) if p)

    def tables(self) -> str:
        out = []
        for tokens, size in SETTINGS:
            keys = [corpus_key(c, tokens) for c in CORPORA]
            if not any(self.muon(size, k) for k in keys):
                continue
            out += [f"### {tokens} tokens, GPT-2 {size} ({self.sw.args.steps[size]} steps): best point per corpus\n",
                    "Cell: final held-out loss, mean of 2 seeds at the optimizer's best seed-0 point (its setting "
                    "below), and in brackets its steps to tuned Muon's final loss as a fraction of Muon's steps "
                    "(mean curve of the seeds; above 1x: it never gets there, and Muon reaches its final loss that "
                    "much sooner). Target: <= 0.85x on every corpus.\n",
                    *self.table("optimizer", [(cv.LABELS[o], [self.point(o, size, k) for k in keys]) for o in ROWS],
                                size, keys, last=("its best settings", self.settings)), ""]
        return "\n".join(out)

    def split_table(self) -> str:
        """Fused projections (``split/``, one machine): torch's Muon as users run it, Muon with the split, and
        newton_schulz split, whole and per head (BPE tokens, both sizes)."""
        out = ["### Fused projections: split into parts, whole, or per head (BPE tokens)\n",
               "GPT-2's `c_attn` holds Q, K and V; since hf_badm.roles each is orthogonalised on its own by default, and "
               "GPT-2's Conv1D weights are scaled as the out x in maps they are. Every row here ran on one machine, torch's "
               "Muon included (`--stages split`, results in [`results/real-corpora/split/`](results/real-corpora/split/)): "
               "the same recipe run on another machine ended further from these runs than these rows are from each "
               "other, so they are not compared with the tables above (each run records its CPU). Cell as above: mean of 2 seeds at each row's best lr, and steps to this "
               "table's torch Muon's final loss as a fraction of its steps.\n"]
        for size in ("tiny", "small"):
            keys = list(CORPORA)
            if not any(self.point("muon_split", size, k) for k in keys):
                continue
            rows = [(cv.LABELS[o], [self.point(o, size, k) for k in keys]) for o in ("muon", *SPLIT)]
            out += [f"GPT-2 {size}:\n", *self.table("optimizer", rows, size, keys, last=(
                "its best lr", lambda pts: ", ".join(f"{p['learning_rate']:g}" for p in pts if p))), ""]
        return "\n".join(out)

    def places(self) -> list[tuple[str, str]]:
        places = [(corpus_key(c, t), size) for t, size in SETTINGS for c in CORPORA]
        return [(k, size) for k, size in places if self.muon(size, k)]

    def chosen(self, o: str) -> tuple[dict[str, Any], float, int, tuple] | None:
        """Of the optimizer's settings run at every place, the one with the lowest geometric mean of the seed-0
        fraction: (its point, that mean, how many settings ran everywhere, the largest gap to a place's own best)."""
        places = self.places()
        by_setting: dict[tuple, list[float]] = {}
        for k, size in places:
            for p in self.sw.points(o, size, k):
                frac = self.fraction(p["curve"], size, k)
                if frac is not None:
                    by_setting.setdefault((p["learning_rate"], p["rho_over_sigma"], p.get("elementwise_lr")), []).append(frac)
        gms = {key: bc.geomean(v) for key, v in by_setting.items() if len(v) == len(places)}
        if not gms:
            return None
        chosen = min(gms, key=gms.get)
        gaps = []
        for k, size in places:
            pts = self.sw.points(o, size, k)
            at = next(p for p in pts if (p["learning_rate"], p["rho_over_sigma"], p.get("elementwise_lr")) == chosen)
            best = min(pts, key=lambda p: p["final_eval_loss"])
            gaps.append((at["final_eval_loss"] - best["final_eval_loss"], k, size, best))
        point = {"learning_rate": chosen[0], "rho_over_sigma": chosen[1], "elementwise_lr": chosen[2]}
        return point, gms[chosen], len(gms), max(gaps, key=lambda g: g[0])

    def defaults(self) -> str:
        """Per optimizer, the setting chosen over every corpus, size and tokenisation (:meth:`chosen`), and each
        place's own best against it."""
        out = ["### Defaults chosen on real text: the geometric mean over corpora, sizes and tokenisations\n",
               f"Over {len(self.places())} places (corpus x size x tokenisation), seed 0: per optimizer, of the settings "
               "run at every place, the one with the lowest geometric mean of the steps-to-Muon fraction; then at each "
               "place its own best setting and how much lower its final loss is than the chosen one's.\n"]
        rows = []
        for o in ROWS:
            if (found := self.chosen(o)) is not None:
                point, gm, n, (gap, k, size, best) = found
                worst = "none (the chosen one is best everywhere)" if gap <= 0 else (
                    f"{gap:.3f} on {k} {size} (its best there: {self.describe(best)})")
                rows.append([cv.LABELS[o], self.describe(point), f"{gm:.2f}x", n, worst])
        return "\n".join(out + bc.md_table(["optimizer", "chosen setting", "geometric mean", "settings run everywhere",
                                            "largest loss gap to a place's own best"], "llrrl", rows)) + "\n"

    def ablation(self) -> str:
        keys = list(CORPORA)
        out = ["### Ablation on the BPE tiny runs: which part of BADM gives what\n",
               "Each row at its best seed-0 lr (the others as its row says); cell: final held-out loss (seed 0) and its "
               "steps to tuned Muon's final loss (mean of Muon's 2 seeds) as a fraction of Muon's steps.\n",
               *self.table("setting", [(label, [self.point(o, "tiny", k, ratio, lr) for k in keys])
                                       for label, o, ratio, lr in ABLATION], "tiny", keys, all_seeds=False)]
        return "\n".join(out) + "\n"


# The sweep settings of every stage (cv.Sweep's protocol fields): its steps, every optimizer, the CPU.
PROTOCOL = {"steps": {"tiny": 300, "small": 150}, "device": "cpu", "fixed": [], "elementwise_lr": None,
            "optimizers": list(cv.LABELS), "threads": 1}


def load(results: Path = bc.RESULTS / "real-corpora") -> Report:
    """The recorded runs as a :class:`Report` (no corpus gathered, nothing run)."""
    a = argparse.Namespace(**PROTOCOL, extend=1, lean=False)
    return Report(cv.Sweep(a, bc.Results.merged(sorted(results.glob("*.json"))), {}, {}))


def main(argv: list[str] | None = None) -> None:
    p = bc.parser(__doc__)
    p.add_argument("--corpus", action="append", default=[], choices=sorted(bc.GATHERED))
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    p.add_argument("--char", action="store_true", help="byte-level tokens (no merges)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in order: " + ",".join(STAGES))
    p.add_argument("--out-dir", type=Path, default=Path("outputs/bench-realcorpora"))
    p.add_argument("--results", type=Path, default=bc.RESULTS / "real-corpora")
    p.add_argument("--extend", type=int, default=1)
    p.add_argument("--lean", action="store_true", help="fewer points where compute is short: AdamW 0.003/0.01, NorMuon "
                   "at Muon's AdamW lr, newton_schulz with adam at Muon's best lr, nsisa 0.01/0.03, refined: Muon, "
                   "newton_schulz and Muon + QHAdam only, seed 1 of the peers and BADM candidates only")
    p.add_argument("--report", action="store_true", help="write the docs section from the results (runs nothing)")
    p.add_argument("--docs", type=Path, default=bc.DOCS)
    p.add_argument("--note", type=Path, default=None, help="a markdown file: the verdict and reading, put first")
    a = p.parse_args(argv)
    if not a.report and not a.corpus:
        p.error("--corpus is needed to run points (or --report to write the section)")
    vars(a).update(PROTOCOL)
    bc.setup(a)
    base = {**bc.BASE_RECIPE, "num_train_examples": 3000, "num_eval_examples": 100}
    if a.report:  # reads the results only: no corpus is gathered
        rep = load(a.results)
        loads = [r["load_1min"] for r in rep.sw.results.runs]
        note = a.note.read_text().strip() + "\n" if a.note else ""
        stamp = bc.stamp(rep.sw.results.meta, "bash scripts/bench_beyond_muon.sh", loads) if loads else ""
        text = "\n".join([SECTION + "\n", note, stamp,
                          "- every run (all points, all seeds, eval curves): "
                          "[`results/real-corpora/`](results/real-corpora/)\n", rep.tables(), rep.defaults(),
                          rep.ablation(), load(a.results / "split").split_table()])
        print(text)
        bc.write_section(a.docs, SECTION, text)
        return
    corpora = cv.corpora_of([bc.corpus(n, a.out_dir) for n in a.corpus], a.out_dir, a.char)
    sw = cv.Sweep(a, bc.Results.merged([]), base, corpora)
    stages = {"peers": peers, "badm": badm, "search": search, "cross": cross, "seeds": seeds, "split": split}
    for size in a.sizes:
        for c in corpora:
            sw.results = bc.Results(a.results / f"{c}-{size}.json")
            for stage in a.stages.split(","):
                stages[stage](sw, size, c)


if __name__ == "__main__":
    main()
