"""Convergence of tiny-GPT pre-training: BADM (fused, per-sub-batch S=4, preconditioned) vs AdamW, Muon, SGD+momentum
and Schedule-Free AdamW, each with the same learning-rate sweep protocol, at a fixed token budget.

Protocol (identical for every optimizer): every point of a log-spaced learning-rate grid (>= 4 values,
half-decade steps; BADM also over rho/sigma, i.e. its momentum beta = r/(r+1)) trains once with
seed 0; while the best point lies on the edge of the grid, the grid is extended one value in that
direction (at most ``--extend`` times); the best point (lowest final held-out loss) is re-run with further seeds. Reported: the
best final eval loss per optimizer (mean over seeds), and the steps and training wall-clock each
optimizer's best setting needs to reach AdamW's best final loss (the speed-up ratio). Every run goes
into ``results.json`` next to the table (written after each run, so an interrupted sweep resumes).

Every run is ``hf-badm train`` in-process (``hf_badm.app.cli.parse`` + ``hf_badm.app.run.run``) with the
same recipe, data order and token budget; only the optimizer, learning rate and BADM's rho differ.
Muon is torch's ``torch.optim.Muon`` on the hidden matrices with AdamW on the rest (``hf_badm.peers``).
Corpora (``--corpus``): ``builtin`` (generated stories) and ``stdlib_docs`` (real English prose gathered at
run time from the docstrings of Python's standard library; ``scripts/bench_common.py``), each with a
tokenizer trained on its own training text.
Schedule-Free AdamW runs with a constant schedule (it has its own warm-up and averaging); all others
with cosine decay and 20 warm-up steps. Lion (``lion_32bit``) needs bitsandbytes and is skipped
when that is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
from hf_badm.optim.local_solve import LOCAL_SOLVES  # noqa: E402
from hf_badm.peers import MUON_ADAMW_LR  # noqa: E402

SECTION = "## Convergence: pre-training sweeps and speed-up vs AdamW"
LABELS = {"badm": "BADM fused", "badm_s4": "BADM per-sub-batch (S=4)", "adamw_torch": "AdamW", "sgd": "SGD+momentum 0.9",
          "schedule_free_adamw": "Schedule-Free AdamW", "lion_32bit": "Lion",
          "badm_sm": "BADM second_moment", "badm_norm": "BADM normalized",
          "badm_ns": "BADM newton_schulz (elementwise second_moment)",
          "badm_ns_norm": "BADM newton_schulz (elementwise normalized)",
          "badm_ns_norm_s4": "BADM newton_schulz (elementwise normalized), per-sub-batch (S=4)",
          "badm_ns_norm_r3": "BADM newton_schulz (elementwise normalized), rho = 3 sigma",
          "badm_ns_norm_r9": "BADM newton_schulz (elementwise normalized), rho = 9 sigma",
          "badm_nsisa": "BADM nsisa (the authors' NSISA, elementwise normalized)",
          "badm_normuon": "BADM normuon (elementwise normalized)",
          "badm_ns_norm_pe": "BADM newton_schulz, Polar Express coefficients (elementwise normalized)",
          "badm_ns_norm_rms": "BADM newton_schulz, match_rms_adamw lr scale (elementwise normalized)",
          "badm_ns_norm_e4": "BADM newton_schulz (elementwise normalized at rho/sigma 4: beta 0.8, nu 3/4)",
          "badm_ns_norm_e19": "BADM newton_schulz (elementwise normalized at rho/sigma 19: beta 0.95, nu 18/19)",
          "badm_ns_adam": "BADM newton_schulz (elementwise adam)",
          "badm_nsisa_adam": "BADM nsisa (elementwise adam)",
          "badm_nsisa_adam_sq": "BADM nsisa (elementwise adam), the authors' warm-down sigma_t = sigma/f_t^2",
          "badm_ns_adam_s2": "BADM newton_schulz (elementwise adam), per-sub-batch S=2, no clipping",
          "badm_nsisa_adam_s2": "BADM nsisa (elementwise adam), per-sub-batch S=2, no clipping, gamma = alpha",
          "badm_nsisa_adam_s2_one": "BADM nsisa (elementwise adam), per-sub-batch S=2, no clipping, gamma = 1",
          "muon": "Muon (torch, + AdamW elsewhere)", "normuon": "NorMuon (+ AdamW elsewhere)",
          "muon_qhadam": "Muon (torch, + QHAdam nu 8/9 elsewhere)",
          "muon_qhadam_b8": "Muon (torch, + QHAdam beta1 0.8, nu 3/4 elsewhere)",
          "muon_split": "Muon + AdamW with fused projections split (BADM newton_schulz, adam elsewhere, rho = sigma)",
          "badm_ns_norm_parts": "BADM newton_schulz, fused projections split into parts (elementwise normalized)",
          "badm_ns_norm_whole": "BADM newton_schulz, fused projections whole (elementwise normalized)",
          "badm_ns_norm_heads": "BADM newton_schulz, attention parts split per head (elementwise normalized)"}
PEERS = ("muon", "normuon", "muon_qhadam", "muon_qhadam_b8")  # hf_badm.peers: a matrix optimizer with AdamW (lr
# muon_adamw_lr) on the other tensors; muon_qhadam_b8 is the peer of BADM's normalized solve at rho/sigma 4
PEER_RECIPES = {"muon_qhadam_b8": {"optimizer": "muon_qhadam", "adam_beta1": 0.8, "qhadam_nu": 0.75}}
# The BADM family (docs/preconditioners.md): recipe fields on top of optimizer=badm.
S4 = {"mode": "per_sub_batch", "sub_batches_per_micro_batch": 4}
NS_NORM = {"preconditioner": "newton_schulz", "elementwise_preconditioner": "normalized"}
VARIANTS: dict[str, dict[str, Any]] = {
    "badm": {}, "badm_s4": S4, "badm_sm": {"preconditioner": "second_moment"},
    "badm_norm": {"preconditioner": "normalized"},
    "badm_ns": {"preconditioner": "newton_schulz", "elementwise_preconditioner": "second_moment"},
    "badm_ns_norm": NS_NORM, "badm_ns_norm_s4": {**NS_NORM, **S4}, "badm_ns_norm_r3": NS_NORM, "badm_ns_norm_r9": NS_NORM,
    "badm_nsisa": {**NS_NORM, "preconditioner": "nsisa"}, "badm_normuon": {**NS_NORM, "preconditioner": "normuon"},
    "badm_ns_norm_pe": {**NS_NORM, "solve_settings": "ns_coefficients=polar_express"},
    "badm_ns_norm_rms": {**NS_NORM, "solve_settings": "ns_lr_scale=match_rms_adamw"},
    "badm_ns_norm_e4": NS_NORM, "badm_ns_norm_e19": NS_NORM,
}
# Issue 20's search: the tensors Muon's peer gives AdamW take the adam solve at rho = sigma (AdamW itself), so that a
# difference from Muon is the matrices'; large slots (S = 2 of 8 sequences) without clipping, as the authors run it.
NS_ADAM = {"preconditioner": "newton_schulz", "elementwise_preconditioner": "adam"}
NSISA_ADAM = {**NS_ADAM, "preconditioner": "nsisa"}
S2 = {"mode": "per_sub_batch", "sub_batches_per_micro_batch": 2, "max_grad_norm": 0.0}
VARIANTS.update(badm_ns_adam=NS_ADAM, badm_nsisa_adam=NSISA_ADAM,
                badm_nsisa_adam_sq={**NSISA_ADAM, "solve_settings": "sigma_schedule=squared"},
                badm_ns_adam_s2={**NS_ADAM, **S2}, badm_nsisa_adam_s2={**NSISA_ADAM, **S2},
                badm_nsisa_adam_s2_one={**NSISA_ADAM, **S2, "solve_settings": "dual_scale=one"})
# Fused projections (issue 24): the runs named badm_ns_norm / badm_ns_adam above predate hf_badm.roles (c_attn
# orthogonalised whole, GPT-2's Conv1D scaled by its stored (in, out) shape); these name their split.
VARIANTS.update(muon_split={**NS_ADAM, "ns_split": "parts"}, badm_ns_norm_parts={**NS_NORM, "ns_split": "parts"},
                badm_ns_norm_whole={**NS_NORM, "ns_split": "none"}, badm_ns_norm_heads={**NS_NORM, "ns_split": "heads"})
# Each variant's elementwise rho/sigma (else 9: beta 0.9): adam at rho = sigma (AdamW); normalized at 4 and 19.
ELEMENTWISE_RATIO = {**{o: 1.0 for o, v in VARIANTS.items() if v.get("elementwise_preconditioner") == "adam"},
                     "badm_ns_norm_e4": 4.0, "badm_ns_norm_e19": 19.0}
# Preconditioned variants sweep lr at one rho/sigma (second_moment: rho = 6000 sigma, i.e. sigma 0.1 with rho 600 at
# lr 10; normalized: beta 0.9; newton_schulz: rho = sigma as in its prototype); per-sub-batch variants take their
# fused variant's best rho/sigma. newton_schulz with normalized elementwise tensors gives those the best
# normalized learning rate of the same size (elementwise_sigma = 1/lr, elementwise_rho = 9 elementwise_sigma).
FIXED_RATIO = {name: LOCAL_SOLVES[VARIANTS[name]["preconditioner"]].rho_over_sigma for name in VARIANTS if name.startswith("badm_")
               and name not in ("badm_s4", "badm_ns_norm_s4")}
FIXED_RATIO.update(badm_ns_norm_r3=3.0, badm_ns_norm_r9=9.0, muon_split=1.0)  # rho != sigma: the dual as QH momentum over NS directions
# Optimizers whose other tensors (embeddings, head, norms, biases) have a learning rate of their own, and the
# optimizer whose best lr it starts from: BADM newton_schulz's normalized tensors from BADM normalized, Muon's
# AdamW tensors from AdamW.
ELEMENTWISE_FROM = {**{o: "badm_norm" for o, v in VARIANTS.items() if v.get("elementwise_preconditioner") == "normalized"},
                    **{o: "adamw_torch" for o, v in VARIANTS.items() if v.get("elementwise_preconditioner") == "adam"},
                    **{o: "adamw_torch" for o in PEERS}}
PER_SUB_BATCH_OF = {"badm_s4": "badm", "badm_ns_norm_s4": "badm_ns_norm"}
GRIDS: dict[str, list[float]] = {
    "badm": [1.0, 3.0, 10.0, 30.0],
    "badm_s4": [1.0, 3.0, 10.0, 30.0],
    "adamw_torch": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
    "sgd": [0.03, 0.1, 0.3, 1.0],
    "schedule_free_adamw": [1e-3, 3e-3, 1e-2, 3e-2],
    "lion_32bit": [3e-5, 1e-4, 3e-4, 1e-3],
    "badm_sm": [3.0, 10.0, 30.0],
    "badm_norm": [1e-3, 3e-3, 1e-2, 3e-2],
    "badm_ns": [0.01, 0.03, 0.1],
    "badm_ns_norm": [0.01, 0.03, 0.1],
    "badm_ns_norm_s4": [0.01, 0.03, 0.1],
    "badm_ns_norm_r3": [0.01, 0.03, 0.1],
    "badm_ns_norm_r9": [0.01, 0.03, 0.1],
    "badm_nsisa": [0.01, 0.03, 0.1],
    "badm_normuon": [0.01, 0.03],
    "badm_ns_norm_pe": [0.01, 0.03],
    "badm_ns_norm_rms": [0.003, 0.01],  # 0.2 sqrt(max(rows, cols)): 1.6-3.2x the original scale on these matrices
    **{o: [0.01, 0.03] for o in ("badm_ns_adam", "badm_nsisa_adam_sq", "badm_ns_adam_s2", "badm_nsisa_adam_s2",
                                 "badm_nsisa_adam_s2_one")},
    "badm_nsisa_adam": [0.003, 0.01, 0.03],
    "muon": [0.01, 0.03, 0.1],
    "normuon": [0.01, 0.03, 0.1],
    "muon_qhadam": [0.01, 0.03],
    **{o: [0.01, 0.03, 0.1] for o in ("muon_split", "badm_ns_norm_parts", "badm_ns_norm_whole", "badm_ns_norm_heads")},
}
RATIOS = [1.5, 4.0, 9.0, 19.0]  # BADM rho/sigma: beta = 0.6, 0.8, 0.9, 0.95


def nice_up(x: float) -> float:
    """Next value of the 1-3-10 half-decade grid above ``x`` (1 -> 3 -> 10 -> 30)."""
    return float(f"{x * (3 if x / 10 ** math.floor(math.log10(x)) < 2 else 10 / 3):.3g}")


def nice_down(x: float) -> float:
    return float(f"{x / (10 / 3 if x / 10 ** math.floor(math.log10(x)) < 2 else 3):.3g}")


def available_optimizers() -> list[str]:
    names = ["badm", "badm_s4", "adamw_torch", "sgd", "badm_sm", "badm_norm", "badm_ns", "badm_ns_norm", "badm_ns_norm_s4",
             "muon", "normuon", "badm_nsisa", "badm_normuon"]
    if importlib.util.find_spec("schedulefree"):
        names.append("schedule_free_adamw")
    if importlib.util.find_spec("bitsandbytes"):
        names.append("lion_32bit")
    return names


MUON_ADAMW_LR_FIELD = "muon_adamw_lr"


def muon_adamw_lr_supported() -> bool:
    """Whether ``hf-badm train`` has a recipe field for the AdamW lr of Muon's other tensors (else it is
    ``hf_badm.peers.MUON_ADAMW_LR`` and Muon's sweep covers its matrix lr only)."""
    from hf_badm.app import RecipeError
    from hf_badm.app.cli import parse

    try:
        parse({"optimizer": "muon", MUON_ADAMW_LR_FIELD: 0.1, "output_dir": "/nonexistent/probe"}, [], "probe")
    except (RecipeError, ValueError):
        return False
    return True


def recipe(opt: str, lr: float, ratio: float | None, seed: int, size: str, corpus: str, steps: int,
           base: dict[str, Any], out: Path, dataset: str, tokenizer: str, elementwise_lr: float | None = None,
           device: str = "cpu") -> tuple[str, dict[str, Any]]:
    key = f"{corpus}|{size}|{opt}|lr={lr:.4g}|r={ratio if ratio is not None else '-'}|seed={seed}"
    if elementwise_lr is not None:
        key += f"|elr={elementwise_lr:.4g}"
    if device != "cpu":
        key += f"|{device}"
    r = {**base, "model_size": size, "dataset": dataset, "max_steps": steps, "eval_steps": max(1, steps // 10),
         "learning_rate": lr, "seed": seed, "tokenizer_name_or_path": tokenizer, **bc.device_recipe(device),
         "output_dir": str(out / "runs" / key.replace("|", "_").replace("=", ""))}
    if opt in VARIANTS:
        r.update(optimizer="badm", rho=ratio / lr, **VARIANTS[opt])  # sigma = 1/lr (default), rho = ratio * sigma
        if elementwise_lr is not None:
            ratio_e = ELEMENTWISE_RATIO.get(opt, 9.0)
            r.update(elementwise_sigma=1.0 / elementwise_lr, elementwise_rho=ratio_e / elementwise_lr)
    else:
        r.update(PEER_RECIPES.get(opt, {"optimizer": opt}))
    if opt in PEERS and elementwise_lr is not None:
        r[MUON_ADAMW_LR_FIELD] = elementwise_lr
    if opt == "sgd":
        r["optim_args"] = "momentum=0.9"
    if opt == "schedule_free_adamw":
        r["lr_scheduler_type"] = "constant"
    return key, r


class Sweep:
    def __init__(self, args: argparse.Namespace, results: bc.Results, base: dict[str, Any],
                 corpora: dict[str, tuple[str, str]]) -> None:
        """``corpora``: name -> (dataset recipe value, tokenizer directory)."""
        self.args, self.results, self.base, self.corpora = args, results, base, corpora
        self.extended: set[tuple[str, str, str, str]] = set()
        self.muon_elr = any(o in args.optimizers for o in PEERS) and muon_adamw_lr_supported()

    def elementwise_start(self, opt: str, size: str, corpus: str) -> float | None:
        """The elementwise lr a variant starts from: ``--elementwise-lr``, else the best lr of the optimizer it
        builds on (BADM normalized, or AdamW for Muon); None where the variant has no such lr."""
        source = ELEMENTWISE_FROM.get(opt)
        if source is None or (opt in PEERS and not self.muon_elr):
            return None
        if self.args.elementwise_lr is not None:
            return self.args.elementwise_lr
        best = self.best(source, size, corpus)
        if best is None:
            raise SystemExit(f"{opt} takes the best {source} learning rate: include {source} in --optimizers "
                             "(or fix it with --elementwise-lr)")
        return best["learning_rate"]

    def run(self, opt: str, lr: float, ratio: float | None, seed: int, size: str, corpus: str,
            elr: float | None = None, again: bool = False) -> dict[str, Any]:
        """One run (cached by its key); ``elr``: the lr of the tensors a newton_schulz variant or Muon does not
        orthogonalise (default: :meth:`elementwise_start`)."""
        if elr is None:
            elr = self.elementwise_start(opt, size, corpus)
        dataset, tokenizer = self.corpora[corpus]
        key, r = recipe(opt, lr, ratio, seed, size, corpus, self.args.steps[size], self.base, self.args.out_dir,
                        dataset, tokenizer, elr, self.args.device)
        done = self.results.get(key)
        if done is not None and not again:
            return done
        summary = bc.train(r)
        if done is not None and done["final_eval_loss"] != summary["final_eval_loss"]:
            print(f"{key}: re-run ended at {summary['final_eval_loss']} (recorded: {done['final_eval_loss']})")
        entry = {"key": key, "corpus": corpus, "device": self.args.device, "size": size, "optimizer": opt, "learning_rate": lr,
                 "rho_over_sigma": ratio, "elementwise_lr": elr, "seed": seed, "max_steps": self.args.steps[size],
                 "tokens": self.args.steps[size] * r["per_device_train_batch_size"] * r["block_size"], **summary}
        self.results.add(entry)
        print(f"{key}: eval {bc.fmt(entry['final_eval_loss'], '.4f')}  {entry['s_per_step']*1e3:.0f} ms/step  "
              f"load {entry['load_1min']:.1f}", flush=True)
        return entry

    def points(self, opt: str, size: str, corpus: str, seed: int = 0) -> list[dict[str, Any]]:
        return [r for r in self.results.runs if (r["optimizer"], r["size"], r["corpus"], r["seed"]) == (opt, size, corpus, seed)
                and r.get("device", "cpu") == self.args.device and r["final_eval_loss"] is not None
                and math.isfinite(r["final_eval_loss"])]

    def best(self, opt: str, size: str, corpus: str) -> dict[str, Any] | None:
        pts = self.points(opt, size, corpus)
        return min(pts, key=lambda r: r["final_eval_loss"]) if pts else None

    def sweep(self, size: str, corpus: str) -> None:
        opts = self.args.optimizers
        ratios = self.args.ratios
        # (with --elementwise-lr fixed, the elementwise variants need no earlier best and interleave in phase 1)
        later = [o for o in opts if o in PER_SUB_BATCH_OF or (o in ELEMENTWISE_FROM and self.args.elementwise_lr is None)]
        # Phase 1: every base grid point, round-robin across optimizers (so load drift hits all alike).
        # BADM: the full lr x rho/sigma grid, or (--badm-sweep coordinate) lr at --center-ratio, then the
        # other ratios at the best lr (cheaper; used where compute is short).
        coordinate = self.args.badm_sweep == "coordinate"

        def grid(o: str) -> list[tuple[float, float | None]]:
            if o == "badm":
                return ([(lr, self.args.center_ratio) for lr in self.args.grids[o]] if coordinate else
                        [(lr, r) for lr in self.args.grids[o] for r in ratios])
            return [(lr, FIXED_RATIO.get(o)) for lr in self.args.grids[o]]

        jobs = {o: grid(o) for o in opts if o not in later}
        while any(jobs.values()):
            for o in list(jobs):
                if jobs[o]:
                    lr, r = jobs[o].pop(0)
                    self.run(o, lr, r, 0, size, corpus)
        if coordinate and "badm" in opts:
            lr_best = min((p for p in self.points("badm", size, corpus) if p["rho_over_sigma"] == self.args.center_ratio),
                          key=lambda p: p["final_eval_loss"])["learning_rate"]
            for r in ratios:
                self.run("badm", lr_best, r, 0, size, corpus)
        # Phase 2: variants that build on an earlier sweep's best (per-sub-batch at the fused variant's best
        # rho/sigma and elementwise lr; newton_schulz with the best normalized lr on its elementwise tensors, Muon
        # with the best AdamW lr on its AdamW tensors); edge extensions, also of the elementwise lr.
        for o in later:
            fused = PER_SUB_BATCH_OF.get(o)
            if fused is not None and fused not in opts:
                raise SystemExit(f"{o} takes the best rho/sigma of {fused}: include {fused} in --optimizers")
            source = fused or ELEMENTWISE_FROM.get(o)
            if source in opts:
                self.widen(source, size, corpus, "learning_rate")  # settle the best it starts from first
            ratio = self.best(fused, size, corpus)["rho_over_sigma"] if fused else FIXED_RATIO.get(o)
            elr = self.best(fused, size, corpus).get("elementwise_lr") if fused else None
            for lr in self.args.grids[o]:
                self.run(o, lr, ratio, 0, size, corpus, elr)
            if not fused and self.args.elementwise_lr is None and self.elementwise_start(o, size, corpus) is not None:
                self.widen(o, size, corpus, "elementwise_lr")
        for spec in self.args.extra:  # extra single points, e.g. badm=10@19 (recorded like every other point)
            name, point = spec.split("=", 1)
            lr, _, ratio = point.partition("@")
            if name in opts:
                self.run(name, float(lr), float(ratio) if ratio else None, 0, size, corpus)
        for o in opts:
            self.widen(o, size, corpus, "learning_rate")
        # Phase 3: more seeds of each optimizer's best point.
        for seed in range(1, self.args.seeds):
            for o in opts:
                b = self.best(o, size, corpus)
                self.run(o, b["learning_rate"], b["rho_over_sigma"], seed, size, corpus, b.get("elementwise_lr"))

    def retime(self, size: str, corpus: str) -> None:
        """Re-run every optimizer's best point (all its seeds) round-robin in one pass, replacing the recorded
        runs: sweeps recorded in different sessions ran under different machine load, and the wall-clock
        columns must compare runs timed together (the losses repeat exactly; a difference is printed)."""
        best = {o: self.best(o, size, corpus) for o in self.args.optimizers}
        for seed in range(self.args.seeds):
            for o, b in best.items():
                if b is not None:
                    self.run(o, b["learning_rate"], b["rho_over_sigma"], seed, size, corpus, b.get("elementwise_lr"),
                             again=True)

    def widen(self, o: str, size: str, corpus: str, axis: str) -> None:
        """Add values along ``axis`` (``learning_rate`` or ``elementwise_lr``), the best seed-0 point's other
        coordinates held, while that best lies on the edge of the values tried: half a decade beyond the edge
        each time, at most ``--extend`` times per optimizer and axis. Once the best is interior this adds
        nothing, so re-running a sweep command is idempotent."""
        if (o, size, corpus, axis) in self.extended or o in self.args.fixed:
            return
        self.extended.add((o, size, corpus, axis))
        coords = ("learning_rate", "rho_over_sigma", "elementwise_lr")
        for _ in range(self.args.extend):
            best = self.best(o, size, corpus)
            if best is None or best.get(axis) is None:
                return
            tried = sorted({p[axis] for p in self.points(o, size, corpus)
                            if all(p.get(k) == best.get(k) for k in coords if k != axis)})
            todo = ([nice_down(tried[0])] if best[axis] == tried[0] else []) + (
                [nice_up(tried[-1])] if best[axis] == tried[-1] else [])
            if not todo:
                return
            for value in todo:
                point = {**{k: best.get(k) for k in coords}, axis: value}
                self.run(o, point["learning_rate"], point["rho_over_sigma"], 0, size, corpus, point["elementwise_lr"])


# ----------------------------------------------------------------------------- report

def seeds_of(results: bc.Results, best: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in results.runs if all(r.get(k) == best.get(k) for k in ("corpus", "size", "optimizer", "learning_rate",
                                                                              "rho_over_sigma", "elementwise_lr"))
            and r.get("device", "cpu") == best.get("device", "cpu")]


REFERENCES = {"adamw_torch": "AdamW", "muon": "Muon", "normuon": "NorMuon"}


def speedup_table(sweep: Sweep, size: str, corpus: str, ref: str = "adamw_torch") -> tuple[str, dict[str, Any]]:
    """Every optimizer's best point against ``ref``'s best final loss (the target): steps and seconds to reach it."""
    res, opts, name = sweep.results, sweep.args.optimizers, REFERENCES[ref]
    ref_best = sweep.best(ref, size, corpus)
    target = statistics.mean(r["final_eval_loss"] for r in seeds_of(res, ref_best))
    steps = ref_best["max_steps"]
    ref_s = statistics.mean(r["train_s"] for r in seeds_of(res, ref_best))
    rows = [f"{name}'s best final eval loss (target): **{target:.4f}** (lr {ref_best['learning_rate']:g}, mean of "
            f"{len(seeds_of(res, ref_best))} seeds) after {steps} steps = {ref_best['tokens']:,} tokens.\n",
            "| optimizer | best lr | rho/sigma | final eval loss, mean (min–max), seeds | steps to target | speed-up (steps) "
            "| ms/step (its best point's runs) | train s to target | speed-up (wall-clock) |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    summary: dict[str, Any] = {"target": target, "optimizers": {}}
    for o in opts:
        best = sweep.best(o, size, corpus)
        if best is None:
            continue
        runs = seeds_of(res, best)
        losses = [r["final_eval_loss"] for r in runs]
        reach = [bc.steps_to_reach(r["curve"], target) for r in runs]
        reach_s = [bc.steps_to_reach(r["curve"], target, key="train_s") for r in runs]
        all_ms = statistics.median(r["s_per_step"] for r in runs) * 1e3
        ok = [x for x in reach if x is not None]
        ok_s = [x for x in reach_s if x is not None]
        n_ok = f" ({len(ok)}/{len(runs)} seeds)" if 0 < len(ok) < len(runs) else ""
        st = statistics.mean(ok) if ok else None
        ss = statistics.mean(ok_s) if ok_s else None
        sp = steps / st if st else None
        spw = ref_s / ss if ss else None
        if st is None:  # never reached the reference's loss: compare at this optimizer's own final loss instead
            own = statistics.mean(losses)
            a_st = [bc.steps_to_reach(r["curve"], own) for r in seeds_of(res, ref_best)]
            a_ss = [bc.steps_to_reach(r["curve"], own, key="train_s") for r in seeds_of(res, ref_best)]
            if all(x is not None for x in a_st + a_ss):
                sp = statistics.mean(a_st) / best["max_steps"]
                spw = statistics.mean(a_ss) / statistics.mean(r["train_s"] for r in runs)
                n_ok = f" ({name} reaches its final loss at step {statistics.mean(a_st):.0f})"
        if o == ref:
            st, ss, sp, spw, n_ok = float(steps), ref_s, 1.0, 1.0, " (by definition)"
        summary["optimizers"][o] = {"learning_rate": best["learning_rate"], "rho_over_sigma": best["rho_over_sigma"],
                                    "elementwise_lr": best.get("elementwise_lr"),
                                    "final_eval_loss_mean": statistics.mean(losses), "seeds": len(runs),
                                    "steps_to_target": st, "speedup_steps": sp, "train_s_to_target": ss,
                                    "speedup_wall": spw, "ms_per_step": all_ms}
        elr = f" (elementwise {best['elementwise_lr']:g})" if best.get("elementwise_lr") else ""
        rows.append(f"| {LABELS[o]} | {best['learning_rate']:g}{elr} | {bc.fmt(best['rho_over_sigma'], 'g')} "
                    f"| {statistics.mean(losses):.4f} ({min(losses):.4f}–{max(losses):.4f}), {len(runs)} "
                    f"| {bc.fmt(st, '.0f', 'not reached')}{n_ok} | {bc.fmt(sp, '.2f', '–')}x | {all_ms:.0f} "
                    f"| {bc.fmt(ss, '.1f', 'not reached')} | {bc.fmt(spw, '.2f', '–')}x |".replace("–x", "–"))
    rows.append(f"\nSpeed-up = {name}'s steps (training seconds) to the target / the optimizer's. Where an optimizer "
                f"never reaches the target, the speed-up is taken at its own final loss instead: {name}'s steps "
                f"(seconds) to reach that loss / the optimizer's full budget; below 1x means slower than {name}.")
    return "\n".join(rows), summary


def grid_tables(sweep: Sweep, size: str, corpus: str) -> str:
    """Every seed-0 sweep point: BADM as an lr x rho/sigma grid, the others as lr -> loss lists."""
    out = []
    pts = sweep.points("badm", size, corpus)
    if pts:
        lrs = sorted({p["learning_rate"] for p in pts})
        ratios = sorted({p["rho_over_sigma"] for p in pts})
        out.append("BADM fused, final eval loss, seed 0 (rows: lr = 1/sigma; columns: rho/sigma, beta = r/(r+1)):\n")
        out.append("| lr \\ rho/sigma | " + " | ".join(f"{r:g} (beta {r/(r+1):.2f})" for r in ratios) + " |")
        out.append("|---|" + "---:|" * len(ratios))
        for lr in lrs:
            cells = []
            for r in ratios:
                p = next((p for p in pts if p["learning_rate"] == lr and p["rho_over_sigma"] == r), None)
                cells.append(bc.fmt(p and p["final_eval_loss"], ".3f"))
            out.append(f"| {lr:g} | " + " | ".join(cells) + " |")
        out.append("")
    out.append("Other sweeps, final eval loss at seed 0 (lr: loss):\n")
    for o in sweep.args.optimizers:
        if o == "badm":
            continue
        p = sorted(sweep.points(o, size, corpus), key=lambda p: (p["learning_rate"], p["rho_over_sigma"] or 0,
                                                                  p.get("elementwise_lr") or 0))
        if not p:
            continue
        ratios = {q["rho_over_sigma"] for q in p}
        elrs = {q.get("elementwise_lr") for q in p}
        extra = f" (rho/sigma {p[0]['rho_over_sigma']:g})" if o in VARIANTS and len(ratios) == 1 else ""
        if len(elrs) == 1 and p[0].get("elementwise_lr"):
            extra += f" (elementwise lr {p[0]['elementwise_lr']:g})"

        def point(q: dict[str, Any]) -> str:  # the swept coordinates that vary within this optimizer's points
            return (f"{q['learning_rate']:g}" + (f" r{q['rho_over_sigma']:g}" if len(ratios) > 1 else "")
                    + (f" elr{q['elementwise_lr']:g}" if len(elrs) > 1 else ""))

        out.append(f"- {LABELS[o]}{extra}: " + ", ".join(f"{point(q)}: {q['final_eval_loss']:.3f}" for q in p))
    return "\n".join(out) + "\n"


def plot(sweep: Sweep, size: str, corpus: str, target: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for o in sweep.args.optimizers:
        b = sweep.best(o, size, corpus)
        if b is None:
            continue
        label = (f"{LABELS[o]} (lr {b['learning_rate']:g}" + (f", r {b['rho_over_sigma']:g}" if b["rho_over_sigma"] else "")
                 + (f", elementwise lr {b['elementwise_lr']:g}" if b.get("elementwise_lr") else "") + ")")
        steps = [p["step"] for p in b["curve"]]
        axes[0].plot(steps, [p["eval_loss"] for p in b["curve"]], marker=".", label=label)
        axes[1].plot([p["train_s"] for p in b["curve"]], [p["eval_loss"] for p in b["curve"]], marker=".", label=label)
        pts = sorted(sweep.points(o, size, corpus), key=lambda p: p["learning_rate"])
        if o == "badm":
            for r in sorted({p["rho_over_sigma"] for p in pts}):
                q = [p for p in pts if p["rho_over_sigma"] == r]
                axes[2].plot([p["learning_rate"] for p in q], [p["final_eval_loss"] for p in q], marker="o",
                             label=f"BADM fused r={r:g}")
        else:  # the lr sweep through the best point (other rho/sigma and elementwise lr: in the tables)
            pts = [p for p in pts if (p["rho_over_sigma"], p.get("elementwise_lr")) == (b["rho_over_sigma"],
                                                                                         b.get("elementwise_lr"))]
            axes[2].plot([p["learning_rate"] for p in pts], [p["final_eval_loss"] for p in pts], marker="o", label=LABELS[o])
    for ax, xl in zip(axes, ("step", "training wall-clock (s, eval excluded)", "learning rate (BADM: 1/sigma)")):
        ax.axhline(target, color="gray", ls="--", lw=0.8)
        ax.set_xlabel(xl)
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
    axes[2].set_xscale("log")
    finals = [p["final_eval_loss"] for o in sweep.args.optimizers for p in sweep.points(o, size, corpus)]
    if finals:
        axes[2].set_ylim(min(finals) - 0.1, min(max(finals), min(finals) + 3) + 0.1)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=6)
    fig.suptitle(f"{corpus} corpus, GPT-2 {size}: best setting per optimizer (dashed: AdamW's best final loss)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


CORPUS_TEXT = {
    "builtin": "the built-in generated corpus ({num_train} stories; held-out: {num_eval})",
    "stdlib_docs": "stdlib_docs, real English prose gathered at run time from the docstrings of Python's standard "
                   "library and pydoc's topics ({paragraphs:,} paragraphs, {characters:,} characters, Python {python}; "
                   "every 20th paragraph held out; nothing copied into the repository)",
    "debian_changelogs": "debian_changelogs, the change entries of the Debian changelogs of this machine's packages "
                         "(/usr/share/doc/*/changelog*.gz, packages sorted, the first {characters:,} characters: "
                         "{paragraphs:,} entries; every 20th held out; gathered at run time)",
    "licenses": "licenses, legal English from /usr/share/common-licenses and the packages' copyright files "
                "({paragraphs:,} distinct paragraphs, {characters:,} characters; every 20th held out; gathered at run "
                "time)",
}


# The shared default lr of each optimizer (hf_badm.app.learning_rates.COMPARE_LEARNING_RATES; AdamW: the tiny sweep's best,
# DEMO_LEARNING_RATES), against which each corpus's own best is reported.
DEFAULT_LR_KEY = {"muon": "muon", "normuon": "normuon", "badm_ns_norm": "badm-newton_schulz", "badm_nsisa": "badm-nsisa",
                  "badm_normuon": "badm-normuon"}
TARGET_RATIO = 0.85  # issue 20's target: tuned Muon's final loss in <= 0.85x Muon's steps


def default_lr(o: str) -> float | None:
    from hf_badm.app.learning_rates import COMPARE_LEARNING_RATES, DEMO_LEARNING_RATES

    if o == "adamw_torch":
        return DEMO_LEARNING_RATES["adamw_torch"]
    return COMPARE_LEARNING_RATES.get(DEFAULT_LR_KEY.get(o, ""))


def cross_corpus(sweep: Sweep, corpora: list[str], size: str, summaries: dict[str, Any], heading: str) -> str:
    """Per size: each optimizer's best lr on each corpus against its shared default (and what the default costs in
    final loss, seed 0), then its steps to tuned Muon's final loss as a fraction of Muon's steps on each corpus, their
    geometric mean, and whether it meets the target (<= 0.85x on every corpus)."""
    opts = [o for o in sweep.args.optimizers if any(sweep.best(o, size, c) for c in corpora)]
    out = [f"{heading} All corpora, GPT-2 {size}: each corpus's best lr against the shared default\n",
           "Cell: the corpus's best lr (seed 0) and, in brackets, how much higher the final loss is at the shared "
           "default lr than at that best (seed 0; +0.000 where they coincide, '–' where the default was not run).\n",
           "| optimizer | shared default lr | " + " | ".join(corpora) + " |", "|---|---:|" + "---:|" * len(corpora)]
    for o in opts:
        d = default_lr(o)
        cells = []
        for c in corpora:
            b = sweep.best(o, size, c)
            if b is None:
                cells.append("–")
                continue
            at_d = [p for p in sweep.points(o, size, c) if d is not None and math.isclose(p["learning_rate"], d)
                    and (p["rho_over_sigma"], p.get("elementwise_lr")) == (b["rho_over_sigma"], b.get("elementwise_lr"))]
            gap = f"+{at_d[0]['final_eval_loss'] - b['final_eval_loss']:.3f}" if at_d else "–"
            if len({p["learning_rate"] for p in sweep.points(o, size, c)}) == 1:
                gap = "the only lr run"
            cells.append(f"{b['learning_rate']:g} ({gap})")
        out.append(f"| {LABELS[o]} | {bc.fmt(d, 'g')} | " + " | ".join(cells) + " |")
    if not all(f"{c}|{size}|vs muon" in summaries for c in corpora):
        return "\n".join(out) + "\n"
    out += ["", f"{heading} All corpora, GPT-2 {size}: steps to tuned Muon's final loss, as a fraction of Muon's steps\n",
            "Cell: steps to reach tuned Muon's mean final held-out loss (each optimizer at its best lr on that corpus, "
            "mean over the seeds that reach it) / Muon's steps; 'not reached' gives the optimizer's own final loss "
            f"against Muon's. Target: <= {TARGET_RATIO}x on every corpus.\n",
            "| optimizer | " + " | ".join(corpora) + " | geometric mean | meets the target |",
            "|---|" + "---:|" * len(corpora) + "---:|---|"]
    for o in opts:
        cells, ratios = [], []
        for c in corpora:
            summ = summaries[f"{c}|{size}|vs muon"]
            r = summ["optimizers"].get(o)
            if r is None:
                cells.append("–")
                ratios.append(None)
            elif r["steps_to_target"] is None:
                there = (f"; Muon reaches {r['final_eval_loss_mean']:.4f} in {r['speedup_steps']:.2f}x its steps"
                         if r["speedup_steps"] is not None else "")
                cells.append(f"not reached ({r['final_eval_loss_mean']:.4f} vs {summ['target']:.4f}{there})")
                ratios.append(None)
            else:
                ratio = r["steps_to_target"] / sweep.args.steps[size]
                reached = sum(bc.steps_to_reach(q["curve"], summ["target"]) is not None
                              for q in seeds_of(sweep.results, sweep.best(o, size, c)))
                cells.append(f"{ratio:.2f}x" + (f" ({reached}/{r['seeds']} seeds)" if reached < r["seeds"] else ""))
                ratios.append(ratio)
        gm = (math.exp(statistics.mean(math.log(x) for x in ratios)) if ratios and all(x is not None for x in ratios)
              else None)
        meets = ("(the reference)" if o == "muon" else
                 "yes" if gm is not None and max(ratios) <= TARGET_RATIO else "no")
        out.append(f"| {LABELS[o]} | " + " | ".join(cells) + f" | {bc.fmt(gm, '.2f', '–')}" + ("x" if gm else "")
                   + f" | {meets} |")
    return "\n".join(out) + "\n"


def describe_corpus(name: str, spec: str, a: argparse.Namespace) -> str:
    if name.endswith(bc.CHAR_SUFFIX):
        return describe_corpus(name[:-len(bc.CHAR_SUFFIX)], spec, a) + " (byte-level tokens, no merges)"
    if name in CORPUS_TEXT:
        info = {"paragraphs": 0, "characters": 0, "python": "?", **bc.corpus_info(spec)}
        return CORPUS_TEXT[name].format(num_train=a.num_train, num_eval=a.num_eval, **info)
    return f"{name} ({spec})"


def report(sweep: Sweep, corpora: list[str], sizes: list[str], docs_dir: Path, results_rel: str,
           title: str = SECTION, figures: bool = True) -> tuple[str, dict[str, Any]]:
    """The section's markdown and a summary per corpus and size; ``figures``: also draw the plots under docs_dir."""
    res = sweep.results
    a = sweep.args
    loads = [r["load_1min"] for r in res.runs if r.get("device", "cpu") == a.device]
    retimed = a.retime or a.section == SECTION  # the main section's best points were re-run together
    where = ("on a shared 2-core machine, so it is noisy" + ("; the best points of all optimizers were re-run together "
             "(--retime) so that their wall-clock columns were timed under the same load" if retimed else
             "; the runs were not re-timed together: compare steps, not seconds") if a.device == "cpu" else
             f"on {a.device}")
    text = [f"{title}\n",
            "GPT-2 models built from config (tiny: 2 layers x 64, small: 4 x 128), trained from scratch on "
            + "; and on ".join(describe_corpus(c, sweep.corpora.get(c, ("builtin",))[0], a) for c in corpora)
            + ", each corpus with its own BPE tokenizer (vocab 1024; built-in: the library's, trained on the generated "
            "stories and tasks; others: trained on their training text); block 64, batch 16, "
            "cosine schedule with 20 warm-up steps (Schedule-Free AdamW: constant), global-norm clipping 1.0, no "
            "weight decay. Sweep protocol, the same for every optimizer: a log-spaced learning-rate grid (half "
            "decades; BADM fused also over rho/sigma = r, momentum beta = r/(r+1)), one run per point "
            f"with seed 0, the grid extended half a decade at a time while the best lies on its edge (at most {a.extend} "
            f"times), then the best point re-run to {a.seeds} seeds. BADM per-sub-batch (S = 4 sub-batches of 4 "
            "sequences, each sub-batch's gradient clipped on its own) sweeps lr at the fused sweep's best r. The "
            "preconditioned BADM variants (docs/preconditioners.md) sweep lr at one r each: second_moment r = 6000, "
            "normalized r = 9, newton_schulz r = 1 (= Muon on the hidden matrices) and, where listed, r = 3 and 9 "
            "(the dual as quasi-hyperbolic momentum over the orthogonalised directions); their elementwise tensors: "
            "second_moment with sigma 0.1, rho 600, or normalized with r = 9 and their own lr, swept like the lr from "
            "the best normalized lr of the same size at the best matrix lr; the per-sub-batch form at the fused "
            "form's best r and elementwise lr. Muon is torch's `torch.optim.Muon` (Nesterov 0.95, 5 Newton-Schulz "
            "steps in bfloat16, lr scaled by sqrt(max(1, rows/cols)) as BADM's) on the same hidden matrices, with "
            "AdamW on the embeddings, head, norms and biases "
            + ("(its lr: the elementwise lr below). " if sweep.muon_elr and a.elementwise_lr else
               "(its lr swept like the elementwise lr, from AdamW's best lr). " if sweep.muon_elr else
               f"at lr {MUON_ADAMW_LR:g} (`hf_badm.peers` default; this `hf-badm train` has no field to sweep it). ")
            + (f"The elementwise lr was fixed at {a.elementwise_lr:g} (--elementwise-lr). " if a.elementwise_lr else "")
            + "'Steps to target' interpolates linearly between the 10 evaluations of a run; wall-clock is training "
            f"time with evaluation excluded, {where}. Lion needs bitsandbytes: run only where installed.\n",
            *([a.note + "\n"] if a.note else []),
            bc.stamp(res.meta, a.command, loads),
            f"- every run (all sweep points, all seeds, eval curves): [`{results_rel}`]({results_rel})\n"]
    summaries = {}
    for corpus in corpora:
        for size in sizes:
            refs = [ref for ref in REFERENCES if sweep.best(ref, size, corpus) is not None]
            if not refs:
                continue
            tables = []
            for ref in refs:
                table, summary = speedup_table(sweep, size, corpus, ref)
                summaries[f"{corpus}|{size}|vs {ref}"] = summary
                tables.append(table + "\n")
            suffix = "" if a.device == "cpu" else f"-{a.device}"
            figure = ""
            if figures:
                try:
                    fig = plot(sweep, size, corpus, summaries[f"{corpus}|{size}|vs {refs[0]}"]["target"],
                               docs_dir / "figures" / f"convergence-{corpus}-{size}{suffix}.png")
                    figure = f"![convergence {corpus} {size}](figures/{fig.name})\n"
                except ImportError:  # matplotlib is an optional extra
                    figure = "(plot skipped: matplotlib is not installed)\n"
            heading = "#" * (len(title) - len(title.lstrip("#")) + 1)  # one level below the section's
            text += [f"{heading} {corpus} corpus, GPT-2 {size} ({a.steps[size]} steps)\n", *tables, figure,
                     grid_tables(sweep, size, corpus)]
    if a.cross_corpus:
        heading = "#" * (len(title) - len(title.lstrip("#")) + 1)
        for size in sizes:
            text.append(cross_corpus(sweep, corpora, size, summaries, heading))
    return "\n".join(text), summaries


def corpora_of(specs: list[str], out_dir: Path, chars: bool) -> dict[str, tuple[str, str]]:
    """name -> (dataset recipe value, tokenizer directory); ``chars``: byte-level tokens, names ending in -char."""
    return {bc.corpus_name(spec) + (bc.CHAR_SUFFIX if chars else ""): (spec, bc.benchmark_tokenizer(out_dir, spec, chars))
            for spec in specs}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", action="append", default=None, metavar="NAME",
                   help="builtin (default), stdlib_docs, or a text file; repeat for several")
    p.add_argument("--text", nargs="*", default=[], help="extra text files (each one more corpus)")
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    p.add_argument("--steps", default="tiny=300,small=150", help="training steps per size (batch 16 x 64 tokens each)")
    p.add_argument("--optimizers", default=None, help="comma-separated subset of " + ",".join(LABELS))
    p.add_argument("--grid", action="append", default=[], metavar="OPT=LR,LR,...",
                   help="replace an optimizer's learning-rate grid, e.g. adamw_torch=0.001,0.003,0.01,0.03")
    p.add_argument("--badm-sweep", choices=["full", "coordinate"], default="full",
                   help="BADM: full lr x rho/sigma grid, or lr at --center-ratio then rho/sigma at the best lr")
    p.add_argument("--center-ratio", type=float, default=9.0)
    p.add_argument("--extra", action="append", default=[], metavar="OPT=LR[@RATIO]",
                   help="extra seed-0 points, e.g. badm=10@19 (they join the sweep and can win it)")
    p.add_argument("--elementwise-lr", type=float, default=None, help="fix the lr of the tensors newton_schulz and "
                   "Muon do not orthogonalise (default: swept, from the best BADM normalized / AdamW lr)")
    p.add_argument("--seeds", type=int, default=2, help="seeds of each optimizer's best point (default 2)")
    p.add_argument("--fixed", default="", help="comma-separated optimizers run at their grid only, never extended "
                   "(e.g. those run at their defaults)")
    p.add_argument("--cross-corpus", action="store_true", help="add, per size, each corpus's best lr against the "
                   "shared default and every optimizer's steps to tuned Muon's loss on every corpus")
    p.add_argument("--extend", type=int, default=3, help="at most this many grid extensions per optimizer and axis "
                   "while the best lies on the grid's edge (default 3)")
    p.add_argument("--char", action="store_true", help="byte-level tokens (no merges: character-level on ASCII text); "
                   "each corpus is then named NAME-char")
    p.add_argument("--num-train", type=int, default=3000)
    p.add_argument("--num-eval", type=int, default=100)
    bc.add_run_args(p, "convergence", results=bc.RESULTS / "convergence")
    p.add_argument("--section", default=SECTION, help="the docs section (heading line) to write")
    p.add_argument("--shard", default=None, help="suffix of this process's result files, so that processes sweeping "
                   "different optimizers of one corpus and size write different files (the report reads them all)")
    p.add_argument("--no-figures", action="store_true", help="draw no plots (they would replace another section's)")
    p.add_argument("--report-only", action="store_true", help="rebuild tables and plots from the results JSON")
    p.add_argument("--retime", action="store_true", help="after the sweep, re-run each optimizer's best point "
                   "(all seeds) together so that the wall-clock columns compare runs timed under the same load")
    p.add_argument("--note", default=None, help="with --report-only: a sentence on how the runs narrowed the protocol")
    p.add_argument("--commands", default=None, help="with --report-only: the sweep commands to document")
    a = p.parse_args(argv)
    a.command = a.commands or bc.command_line()
    a.fixed = [o for o in a.fixed.split(",") if o]
    a.steps = {k: int(v) for k, v in (kv.split("=") for kv in a.steps.split(","))}
    a.optimizers = [o for o in (a.optimizers.split(",") if a.optimizers else available_optimizers())]
    if unknown := [o for o in a.optimizers if o not in LABELS]:
        p.error(f"unknown optimizer(s) {unknown}; choose from {','.join(LABELS)}")
    a.grids, a.ratios = {k: list(v) for k, v in GRIDS.items()}, list(RATIOS)
    for spec in a.grid:
        name, values = spec.split("=", 1)
        a.grids[name] = [float(v) for v in values.split(",")]
    if a.smoke:
        bc.smoke_paths(a, "convergence")
        a.sizes, a.steps, a.num_train, a.num_eval, a.extend = ["tiny"], {"tiny": 4}, 100, 20, 1
        a.no_write = False
        a.grids = {k: v[1:3] or v for k, v in GRIDS.items()}
        a.ratios = [9.0]
    bc.setup(a)
    base = {**bc.BASE_RECIPE, "num_train_examples": a.num_train, "num_eval_examples": a.num_eval}
    names = [*(a.corpus or ["builtin"]), *a.text]
    specs = [bc.corpus(n, a.out_dir) for n in names]
    corpora = corpora_of(specs, a.out_dir, a.char)
    sweep = Sweep(a, bc.Results.merged([]), base, corpora)
    suffix = ("" if a.device == "cpu" else f"-{a.device}") + (f"-{a.shard}" if a.shard else "")
    if not a.report_only:
        for corpus in corpora:
            for size in a.sizes:
                sweep.results = bc.Results(a.results / f"{corpus}-{size}{suffix}.json")
                sweep.sweep(size, corpus)
                if a.retime:
                    sweep.retime(size, corpus)
    sweep.results = bc.Results.merged(sorted(a.results.glob("*.json")))
    docs_dir = a.docs.parent
    try:
        rel = str(Path(a.results).resolve().relative_to(docs_dir.resolve())) + "/"
    except ValueError:
        rel = str(a.results)
    text, _ = report(sweep, list(corpora), a.sizes, docs_dir, rel, a.section, figures=not (a.no_write or a.no_figures))
    print(text)
    if not a.no_write:
        bc.write_section(a.docs, a.section, text)
        print(f"\nupdated {a.docs}")


if __name__ == "__main__":
    main()
