"""Pre-training sweeps (docs/benchmarks.md, "Convergence"): every optimizer over its own learning-rate grid, extended
while the best is on an edge, its best re-run to more seeds, then steps and seconds to a reference's final loss.
``--admm-vs-muon``: BADM newton_schulz's ADMM settings against Muon at the sweeps' best learning rates."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
from hf_badm.optim.local_solve import LOCAL_SOLVES  # noqa: E402

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
          "muon_whole": "Muon + AdamW with fused projections whole (BADM newton_schulz, adam elsewhere, rho = sigma)",
          "badm_ns_norm_parts": "BADM newton_schulz, fused projections split into parts (elementwise normalized)",
          "badm_ns_norm_whole": "BADM newton_schulz, fused projections whole (elementwise normalized)",
          "badm_ns_norm_heads": "BADM newton_schulz, attention parts split per head (elementwise normalized)"}
PEERS = ("muon", "normuon", "muon_qhadam", "muon_qhadam_b8")  # hf_badm.peers: a matrix optimizer, AdamW elsewhere
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
# Issue 20: adam (AdamW itself) where Muon's peer has AdamW; large slots without clipping, as the authors run it.
NS_ADAM = {"preconditioner": "newton_schulz", "elementwise_preconditioner": "adam"}
NSISA_ADAM = {**NS_ADAM, "preconditioner": "nsisa"}
S2 = {"mode": "per_sub_batch", "sub_batches_per_micro_batch": 2, "max_grad_norm": 0.0}
VARIANTS.update(badm_ns_adam=NS_ADAM, badm_nsisa_adam=NSISA_ADAM,
                badm_nsisa_adam_sq={**NSISA_ADAM, "solve_settings": "sigma_schedule=squared"},
                badm_ns_adam_s2={**NS_ADAM, **S2}, badm_nsisa_adam_s2={**NSISA_ADAM, **S2},
                badm_nsisa_adam_s2_one={**NSISA_ADAM, **S2, "solve_settings": "dual_scale=one"})
# Fused projections (issue 24): badm_ns_norm / badm_ns_adam runs predate hf_badm.roles; these name their split.
VARIANTS.update(muon_split={**NS_ADAM, "ns_split": "parts"}, muon_whole={**NS_ADAM, "ns_split": "none"},
                badm_ns_norm_parts={**NS_NORM, "ns_split": "parts"},
                badm_ns_norm_whole={**NS_NORM, "ns_split": "none"}, badm_ns_norm_heads={**NS_NORM, "ns_split": "heads"})
# Each variant's elementwise rho/sigma (else 9: beta 0.9): adam at rho = sigma (AdamW); normalized at 4 and 19.
ELEMENTWISE_RATIO = {**{o: 1.0 for o, v in VARIANTS.items() if v.get("elementwise_preconditioner") == "adam"},
                     "badm_ns_norm_e4": 4.0, "badm_ns_norm_e19": 19.0}
# Preconditioned variants sweep lr at their solve's rho/sigma; per-sub-batch ones at their fused variant's best.
FIXED_RATIO = {name: LOCAL_SOLVES[VARIANTS[name]["preconditioner"]].rho_over_sigma for name in VARIANTS if name.startswith("badm_")
               and name not in ("badm_s4", "badm_ns_norm_s4")}
FIXED_RATIO.update(badm_ns_norm_r3=3.0, badm_ns_norm_r9=9.0, muon_split=1.0, muon_whole=1.0)  # rho != sigma: the dual as QH momentum over NS directions
# Optimizers whose other tensors have a learning rate of their own -> the optimizer whose best lr it starts from.
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
    **{o: [0.01, 0.03, 0.1] for o in ("badm_ns", "badm_ns_norm", "badm_ns_norm_s4", "badm_ns_norm_r3", "badm_ns_norm_r9",
                                      "badm_nsisa", "muon", "normuon", "muon_split", "muon_whole", "badm_ns_norm_parts",
                                      "badm_ns_norm_whole", "badm_ns_norm_heads")},  # Muon's usual best in the middle
    "badm_normuon": [0.01, 0.03],
    "badm_ns_norm_pe": [0.01, 0.03],
    "badm_ns_norm_rms": [0.003, 0.01],  # 0.2 sqrt(max(rows, cols)): 1.6-3.2x the original scale on these matrices
    **{o: [0.01, 0.03] for o in ("badm_ns_adam", "badm_nsisa_adam_sq", "badm_ns_adam_s2", "badm_nsisa_adam_s2",
                                 "badm_nsisa_adam_s2_one")},
    "badm_nsisa_adam": [0.003, 0.01, 0.03],
    "muon_qhadam": [0.01, 0.03],
}
RATIOS = [1.5, 4.0, 9.0, 19.0]  # BADM rho/sigma: beta = 0.6, 0.8, 0.9, 0.95


def nice_up(x: float) -> float:
    """Next value of the 1-3-10 half-decade grid above ``x``; :func:`nice_down` the one below."""
    return float(f"{x * (3 if x / 10 ** math.floor(math.log10(x)) < 2 else 10 / 3):.3g}")


def nice_down(x: float) -> float:
    return float(f"{x / (10 / 3 if x / 10 ** math.floor(math.log10(x)) < 2 else 3):.3g}")


def available_optimizers() -> list[str]:
    return ["badm", "badm_s4", "adamw_torch", "sgd", "badm_sm", "badm_norm", "badm_ns", "badm_ns_norm", "badm_ns_norm_s4",
            "muon", "normuon", "badm_nsisa", "badm_normuon"] + [
        o for o, m in (("schedule_free_adamw", "schedulefree"), ("lion_32bit", "bitsandbytes")) if importlib.util.find_spec(m)]


def recipe(opt: str, lr: float, ratio: float | None, seed: int, size: str, corpus: str, steps: int,
           base: dict[str, Any], out: Path, dataset: str, tokenizer: str, elementwise_lr: float | None = None,
           device: str = "cpu") -> tuple[str, dict[str, Any]]:
    """A sweep point's key and recipe (BADM: sigma = 1/lr, rho = ratio sigma)."""
    key = f"{corpus}|{size}|{opt}|lr={lr:.4g}|r={ratio if ratio is not None else '-'}|seed={seed}"
    key += (f"|elr={elementwise_lr:.4g}" if elementwise_lr is not None else "") + (f"|{device}" if device != "cpu" else "")
    r = bc.recipe(key, out, device, steps, {**base, "model_size": size, "dataset": dataset, "learning_rate": lr,
                                            "seed": seed, "tokenizer_name_or_path": tokenizer})
    if opt in VARIANTS:
        r.update(optimizer="badm", rho=ratio / lr, **VARIANTS[opt])
        if elementwise_lr is not None:
            r.update(elementwise_sigma=1 / elementwise_lr, elementwise_rho=ELEMENTWISE_RATIO.get(opt, 9.0) / elementwise_lr)
    else:
        r.update(PEER_RECIPES.get(opt, {"optimizer": opt}))
    if opt in PEERS and elementwise_lr is not None:
        r["muon_adamw_lr"] = elementwise_lr
    if opt == "sgd":
        r["optim_args"] = "momentum=0.9"
    if opt == "schedule_free_adamw":
        r["lr_scheduler_type"] = "constant"
    return key, r


class Sweep:
    """The runs of one results file and the protocol over them; ``corpora``: name -> (dataset, tokenizer)."""

    def __init__(self, args: argparse.Namespace, results: bc.Results, base: dict[str, Any],
                 corpora: dict[str, tuple[str, str]]) -> None:
        self.args, self.results, self.base, self.corpora = args, results, base, corpora
        self.extended: set[tuple[str, str, str, str]] = set()

    def elementwise_start(self, opt: str, size: str, corpus: str) -> float | None:
        """The elementwise lr a variant starts from: ``--elementwise-lr``, else its source optimizer's best lr."""
        source = ELEMENTWISE_FROM.get(opt)
        if source is None:
            return None
        if self.args.elementwise_lr is not None:
            return self.args.elementwise_lr
        if (best := self.best(source, size, corpus)) is None:
            raise SystemExit(f"{opt} takes the best {source} learning rate: include {source} in --optimizers "
                             "(or fix it with --elementwise-lr)")
        return best["learning_rate"]

    def run(self, opt: str, lr: float, ratio: float | None, seed: int, size: str, corpus: str,
            elr: float | None = None, again: bool = False) -> dict[str, Any]:
        """One run, cached by its key (``again``: re-run and replace it)."""
        elr = self.elementwise_start(opt, size, corpus) if elr is None else elr
        steps = self.args.steps[size]
        key, r = recipe(opt, lr, ratio, seed, size, corpus, steps, self.base, self.args.out_dir,
                        *self.corpora[corpus], elr, self.args.device)
        done = self.results.get(key)
        if done is not None and not again:
            return done
        summary = bc.train(r)
        if done is not None and done["final_eval_loss"] != summary["final_eval_loss"]:
            print(f"{key}: re-run ended at {summary['final_eval_loss']} (recorded: {done['final_eval_loss']})")
        entry = {"key": key, "corpus": corpus, "device": self.args.device, "size": size, "optimizer": opt,
                 "learning_rate": lr, "rho_over_sigma": ratio, "elementwise_lr": elr, "seed": seed, "max_steps": steps,
                 "tokens": steps * r["per_device_train_batch_size"] * r["block_size"], **summary}
        self.results.record(entry)
        return entry

    def points(self, opt: str, size: str, corpus: str, seed: int = 0) -> list[dict[str, Any]]:
        return [r for r in self.results.runs if (r["optimizer"], r["size"], r["corpus"], r["seed"]) == (opt, size, corpus, seed)
                and r.get("device", "cpu") == self.args.device and r["final_eval_loss"] is not None
                and math.isfinite(r["final_eval_loss"])]

    def best(self, opt: str, size: str, corpus: str) -> dict[str, Any] | None:
        return min(self.points(opt, size, corpus), key=lambda r: r["final_eval_loss"], default=None)

    def sweep(self, size: str, corpus: str) -> None:
        """Phase 1: every base grid point, round-robin across optimizers (BADM fused over lr x rho/sigma, or
        ``--badm-sweep coordinate``: lr at --center-ratio, then every ratio at the best lr); phase 2: variants that
        start from another's best, and extra points; edge extensions; phase 3: more seeds of each best point."""
        a, opts = self.args, self.args.optimizers
        later = [o for o in opts if o in PER_SUB_BATCH_OF or (o in ELEMENTWISE_FROM and a.elementwise_lr is None)]
        coordinate = a.badm_sweep == "coordinate"

        def grid(o: str) -> list[tuple[float, float | None]]:
            if o == "badm":
                return [(lr, r) for lr in a.grids[o] for r in ([a.center_ratio] if coordinate else a.ratios)]
            return [(lr, FIXED_RATIO.get(o)) for lr in a.grids[o]]

        jobs = {o: grid(o) for o in opts if o not in later}
        while any(jobs.values()):
            for o in [o for o in jobs if jobs[o]]:
                self.run(o, *jobs[o].pop(0), 0, size, corpus)
        if coordinate and "badm" in opts:
            lr_best = min((p for p in self.points("badm", size, corpus) if p["rho_over_sigma"] == a.center_ratio),
                          key=lambda p: p["final_eval_loss"])["learning_rate"]
            for r in a.ratios:
                self.run("badm", lr_best, r, 0, size, corpus)
        for o in later:
            fused = PER_SUB_BATCH_OF.get(o)
            if fused is not None and fused not in opts:
                raise SystemExit(f"{o} takes the best rho/sigma of {fused}: include {fused} in --optimizers")
            if (source := fused or ELEMENTWISE_FROM.get(o)) in opts:
                self.widen(source, size, corpus, "learning_rate")  # settle the best it starts from first
            ratio = self.best(fused, size, corpus)["rho_over_sigma"] if fused else FIXED_RATIO.get(o)
            elr = self.best(fused, size, corpus).get("elementwise_lr") if fused else None
            for lr in a.grids[o]:
                self.run(o, lr, ratio, 0, size, corpus, elr)
            if not fused and a.elementwise_lr is None and self.elementwise_start(o, size, corpus) is not None:
                self.widen(o, size, corpus, "elementwise_lr")
        for spec in a.extra:  # extra single points, e.g. badm=10@19 (recorded like every other point)
            name, point = spec.split("=", 1)
            lr, _, ratio = point.partition("@")
            if name in opts:
                self.run(name, float(lr), float(ratio) if ratio else None, 0, size, corpus)
        for o in opts:
            self.widen(o, size, corpus, "learning_rate")
        self.reseed(size, corpus, range(1, a.seeds))

    def reseed(self, size: str, corpus: str, seeds: range, again: bool = False) -> None:
        """Each optimizer's best point at ``seeds``; ``again`` (``--retime``): all seeds re-run together, so that the
        wall-clock columns compare runs timed under the same load (the losses repeat exactly)."""
        best = {o: self.best(o, size, corpus) for o in self.args.optimizers}
        for seed in seeds:
            for o, b in best.items():
                if b is not None:
                    self.run(o, b["learning_rate"], b["rho_over_sigma"], seed, size, corpus, b.get("elementwise_lr"), again)

    def widen(self, o: str, size: str, corpus: str, axis: str) -> None:
        """Half a decade beyond the edge along ``axis`` (the best point's other coordinates held) while the best lies
        on the edge, at most ``--extend`` times per optimizer and axis; idempotent once the best is interior."""
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
    """Every optimizer's best point against ``ref``'s best final loss (the target): steps and seconds to reach it;
    where never reached, ``ref``'s steps (seconds) to the optimizer's own final loss over its full budget."""
    res, name = sweep.results, REFERENCES[ref]
    ref_best = sweep.best(ref, size, corpus)
    ref_runs = seeds_of(res, ref_best)
    target, steps = statistics.mean(r["final_eval_loss"] for r in ref_runs), ref_best["max_steps"]
    ref_s = statistics.mean(r["train_s"] for r in ref_runs)
    rows = [f"{name}'s best final eval loss (target): **{target:.4f}** (lr {ref_best['learning_rate']:g}, mean of "
            f"{len(ref_runs)} seeds) after {steps} steps = {ref_best['tokens']:,} tokens.\n"]
    summary: dict[str, Any] = {"target": target, "optimizers": {}}
    table = []
    for o in sweep.args.optimizers:
        if (best := sweep.best(o, size, corpus)) is None:
            continue
        runs = seeds_of(res, best)
        losses = [r["final_eval_loss"] for r in runs]
        (st, n_ok), (ss, _) = bc.reach(runs, target), bc.reach(runs, target, key="train_s")
        all_ms = statistics.median(r["s_per_step"] for r in runs) * 1e3
        sp, spw = (steps / st if st else None), (ref_s / ss if ss else None)
        if st is None:  # never reached: compare at this optimizer's own final loss instead
            own = statistics.mean(losses)
            a_st = [bc.steps_to_reach(r["curve"], own) for r in ref_runs]
            a_ss = [bc.steps_to_reach(r["curve"], own, key="train_s") for r in ref_runs]
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
        table.append([LABELS[o], f"{best['learning_rate']:g}{elr}", bc.fmt(best["rho_over_sigma"], "g"),
                      f"{statistics.mean(losses):.4f} ({min(losses):.4f}–{max(losses):.4f}), {len(runs)}",
                      bc.fmt(st, ".0f", "not reached") + n_ok, bc.ratio(sp), f"{all_ms:.0f}",
                      bc.fmt(ss, ".1f", "not reached"), bc.ratio(spw)])
    rows += bc.md_table(["optimizer", "best lr", "rho/sigma", "final eval loss, mean (min–max), seeds", "steps to target",
                         "speed-up (steps)", "ms/step (its best point's runs)", "train s to target",
                         "speed-up (wall-clock)"], "lrrlrrrrr", table)
    rows.append(f"\nSpeed-up = {name}'s steps (training seconds) to the target / the optimizer's. Where an optimizer "
                f"never reaches the target, the speed-up is taken at its own final loss instead: {name}'s steps "
                f"(seconds) to reach that loss / the optimizer's full budget; below 1x means slower than {name}.")
    return "\n".join(rows), summary


def grid_tables(sweep: Sweep, size: str, corpus: str) -> str:
    """Every seed-0 sweep point: BADM fused as an lr x rho/sigma grid, the others as lr -> loss lists."""
    out = []
    if pts := sweep.points("badm", size, corpus):
        ratios = sorted({p["rho_over_sigma"] for p in pts})
        loss = {(p["learning_rate"], p["rho_over_sigma"]): p["final_eval_loss"] for p in pts}
        out += ["BADM fused, final eval loss, seed 0 (rows: lr = 1/sigma; columns: rho/sigma, beta = r/(r+1)):\n",
                *bc.md_table(["lr \\ rho/sigma", *(f"{r:g} (beta {r/(r+1):.2f})" for r in ratios)], "l" + "r" * len(ratios),
                             [[f"{lr:g}", *(bc.fmt(loss.get((lr, r))) for r in ratios)]
                              for lr in sorted({p["learning_rate"] for p in pts})]), ""]
    out.append("Other sweeps, final eval loss at seed 0 (lr: loss):\n")
    for o in sweep.args.optimizers:
        p = sorted(sweep.points(o, size, corpus), key=lambda p: (p["learning_rate"], p["rho_over_sigma"] or 0,
                                                                  p.get("elementwise_lr") or 0))
        if o == "badm" or not p:
            continue
        ratios, elrs = {q["rho_over_sigma"] for q in p}, {q.get("elementwise_lr") for q in p}
        extra = f" (rho/sigma {p[0]['rho_over_sigma']:g})" if o in VARIANTS and len(ratios) == 1 else ""
        if len(elrs) == 1 and p[0].get("elementwise_lr"):
            extra += f" (elementwise lr {p[0]['elementwise_lr']:g})"
        out.append(f"- {LABELS[o]}{extra}: " + ", ".join(
            f"{q['learning_rate']:g}" + (f" r{q['rho_over_sigma']:g}" if len(ratios) > 1 else "")
            + (f" elr{q['elementwise_lr']:g}" if len(elrs) > 1 else "") + f": {q['final_eval_loss']:.3f}" for q in p))
    return "\n".join(out) + "\n"


def plot(sweep: Sweep, size: str, corpus: str, target: float, path: Path) -> Path:
    """Each optimizer's best curve by step and by training seconds, and its lr sweep through that best point."""
    fig, axes = bc.figure(3, (16, 4.6))
    for o in sweep.args.optimizers:
        if (b := sweep.best(o, size, corpus)) is None:
            continue
        label = (f"{LABELS[o]} (lr {b['learning_rate']:g}" + (f", r {b['rho_over_sigma']:g}" if b["rho_over_sigma"] else "")
                 + (f", elementwise lr {b['elementwise_lr']:g}" if b.get("elementwise_lr") else "") + ")")
        for ax, x in zip(axes, ("step", "train_s")):
            ax.plot([p[x] for p in b["curve"]], [p["eval_loss"] for p in b["curve"]], marker=".", label=label)
        pts = sorted(sweep.points(o, size, corpus), key=lambda p: p["learning_rate"])
        lines = ([(f"BADM fused r={r:g}", [p for p in pts if p["rho_over_sigma"] == r])
                  for r in sorted({p["rho_over_sigma"] for p in pts})] if o == "badm" else
                 [(LABELS[o], [p for p in pts if (p["rho_over_sigma"], p.get("elementwise_lr"))
                               == (b["rho_over_sigma"], b.get("elementwise_lr"))])])
        for name, q in lines:
            axes[2].plot([p["learning_rate"] for p in q], [p["final_eval_loss"] for p in q], marker="o", label=name)
    for ax, xl in zip(axes, ("step", "training wall-clock (s, eval excluded)", "learning rate (BADM: 1/sigma)")):
        ax.axhline(target, color="gray", ls="--", lw=0.8)
        ax.set(xlabel=xl, ylabel="held-out loss")
        ax.grid(alpha=0.3)
    axes[2].set_xscale("log")
    if finals := [p["final_eval_loss"] for o in sweep.args.optimizers for p in sweep.points(o, size, corpus)]:
        axes[2].set_ylim(min(finals) - 0.1, min(max(finals), min(finals) + 3) + 0.1)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=6)
    return bc.save_figure(fig, f"{corpus} corpus, GPT-2 {size}: best setting per optimizer (dashed: AdamW's best "
                               "final loss)", path)


def report(sweep: Sweep, corpora: list[str], sizes: list[str], docs_dir: Path, results_rel: str,
           title: str = SECTION, figures: bool = True) -> tuple[str, dict[str, Any]]:
    """The section (its protocol prose lives in the docs) and a summary per corpus and size; ``figures``: plots."""
    a, res = sweep.args, sweep.results
    text = [f"{title}\n", *([a.note + "\n"] if a.note else []),
            bc.stamp(res.meta, a.command, [r["load_1min"] for r in res.runs if r.get("device", "cpu") == a.device]),
            f"- every run (all sweep points, all seeds, eval curves): [`{results_rel}`]({results_rel})\n"]
    heading = "#" * (len(title) - len(title.lstrip("#")) + 1)  # one level below the section's
    summaries = {}
    for corpus in corpora:
        for size in sizes:
            tables = []
            for ref in [ref for ref in REFERENCES if sweep.best(ref, size, corpus) is not None]:
                table, summaries[f"{corpus}|{size}|vs {ref}"] = speedup_table(sweep, size, corpus, ref)
                tables.append(table + "\n")
            if not tables:
                continue
            figure = ""
            if figures:
                try:
                    target = next(s for k, s in summaries.items() if k.startswith(f"{corpus}|{size}|"))["target"]
                    fig = plot(sweep, size, corpus, target, docs_dir / "figures" /
                               f"convergence-{corpus}-{size}{'' if a.device == 'cpu' else '-' + a.device}.png")
                    figure = f"![convergence {corpus} {size}](figures/{fig.name})\n"
                except ImportError:  # matplotlib is an optional extra
                    figure = "(plot skipped: matplotlib is not installed)\n"
            text += [f"{heading} {corpus} corpus, GPT-2 {size} ({a.steps[size]} steps)\n", *tables, figure,
                     grid_tables(sweep, size, corpus)]
    return "\n".join(text), summaries


def corpora_of(specs: list[str], out_dir: Path, chars: bool = False) -> dict[str, tuple[str, str]]:
    """name -> (dataset recipe value, tokenizer directory); ``chars``: byte-level tokens, names ending in -char."""
    return {bc.corpus_name(spec) + (bc.CHAR_SUFFIX if chars else ""): (spec, bc.benchmark_tokenizer(out_dir, spec, chars))
            for spec in specs}


# ----------------------------------------------------------------------------- --admm-vs-muon

ADMM_SECTION = "## Where ADMM could add to Muon: rho != sigma, per-sub-batch NSISA, larger batches"
ARMS: dict[str, tuple[str, str, dict[str, Any]]] = {  # name -> (label, optimizer above, recipe changes)
    "muon": ("Muon (torch, AdamW elsewhere)", "muon", {}),
    "ns": ("newton_schulz, rho = sigma (Muon on the matrices)", "badm_ns_norm", {}),
    "ns_r3": ("newton_schulz, rho = 3 sigma", "badm_ns_norm_r3", {}),
    **{f"ns_s{s}": (f"newton_schulz per-sub-batch S={s}", "badm_ns_norm_s4", {"sub_batches_per_micro_batch": s})
       for s in (2, 4, 8)}}
ADMM_LR = {("builtin", "tiny"): 0.03, ("builtin", "small"): 0.03, ("stdlib_docs", "tiny"): 0.01,
           ("stdlib_docs", "small"): 0.01}  # the best matrix lr of Muon's and newton_schulz's GPU sweeps
BATCH_ARMS = {16: ["muon", "ns", "ns_r3", "ns_s2", "ns_s4", "ns_s8"], 64: ["muon", "ns", "ns_s4", "ns_s8"]}


def admm_vs_muon(a: argparse.Namespace) -> None:
    """Each arm at its corpus's and size's matrix lr (elementwise lr 0.1), batch 16 and 64, ``--seeds`` seeds, one
    process per run, ``--jobs`` at once; results saved as runs finish."""
    results = a.results if a.results.suffix == ".json" else a.results / "admm_vs_muon.json"
    if not a.report_only:
        work, runs, rows = Path(a.out_dir), [], []
        base = {**bc.BASE_RECIPE, "num_train_examples": a.num_train, "num_eval_examples": a.num_eval}
        for corpus in a.corpus:
            spec = bc.corpus(corpus, work)
            for size in a.sizes:
                for batch, arms in BATCH_ARMS.items():
                    for arm in arms:
                        for seed in range(a.seeds):
                            _, opt, changes = ARMS[arm]
                            key = f"{corpus}|{size}|{batch}|{arm}|{seed}"
                            _, r = recipe(opt, ADMM_LR[(corpus, size)], 3.0 if arm == "ns_r3" else 1.0, seed, size,
                                          corpus, a.steps[size], base, work, spec, bc.benchmark_tokenizer(work, spec),
                                          0.1, a.device)
                            runs.append((key, {**r, **changes, "per_device_train_batch_size": batch,
                                               "output_dir": str(work / "runs" / bc.run_key(key))}))
        print(f"{len(runs)} runs, {a.jobs} at once", flush=True)
        with ThreadPoolExecutor(a.jobs) as pool:
            futures = {pool.submit(bc.in_subprocess, __file__, r, work, key): key for key, r in runs}
            for done in as_completed(futures):
                rows.append({"key": futures[done], **done.result()})
                bc.write_json(results, {"machine": bc.machine(), "command": bc.command_line(), "rows": rows})
                print(f"{len(rows)}/{len(runs)} {rows[-1]['key']}", flush=True)
    saved = json.loads(results.read_text())
    by: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    for r in saved["rows"]:
        if "error" not in r:
            corpus, size, batch, arm, _ = r["key"].split("|")
            by.setdefault((corpus, size, int(batch), arm), []).append(r)
    lines = [f"{ADMM_SECTION}\n"]
    for (corpus, size), batch in ((cs, b) for cs in ((c, s) for c in a.corpus for s in a.sizes) for b in BATCH_ARMS):
        if not (muon := by.get((corpus, size, batch, "muon"))):
            continue
        target, rows = statistics.mean(r["final_eval_loss"] for r in muon), []
        for arm in BATCH_ARMS[batch]:
            if not (rs := by.get((corpus, size, batch, arm))):
                rows.append([ARMS[arm][0], "failed or not run", "", "", ""])
                continue
            losses = [r["final_eval_loss"] for r in rs]
            steps, some = bc.reach(rs, target)
            reach = f"{a.steps[size]} (by definition)" if arm == "muon" else bc.fmt(steps, ".0f") + some
            speed = "1.00x" if arm == "muon" else f"{a.steps[size] / steps:.2f}x" if steps else "not reached"
            rows.append([ARMS[arm][0], f"{statistics.mean(losses):.4f} ({min(losses):.4f}–{max(losses):.4f})", reach,
                         speed, f"{statistics.mean(r['s_per_step'] for r in rs):.3f}"])
        lines += [f"\n#### {corpus}, GPT-2 {size}, batch {batch} ({a.steps[size]} steps, matrix lr "
                  f"{ADMM_LR[(corpus, size)]:g}); Muon's final eval loss {target:.4f}\n",
                  *bc.md_table(["setting", "final eval loss, mean (min–max)", "steps to Muon's final loss",
                                "speed-up vs Muon (steps)", "s/step"], "llrrr", rows)]
    errors = [r["key"] for r in saved["rows"] if "error" in r]
    tail = f"\n\n{len(errors)} run(s) failed: " + "; ".join(errors) if errors else ""
    bc.publish(a, ADMM_SECTION, "\n".join(lines) + tail + "\n\n" + bc.stamp(saved["machine"], saved.get("command", "?")))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if bc.worker(argv, bc.train):
        return
    p = bc.parser(__doc__)
    p.add_argument("--corpus", action="append", default=None, metavar="NAME",
                   help="builtin (default), stdlib_docs, debian_changelogs, licenses or a text file; repeat for several")
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    p.add_argument("--steps", default="tiny=300,small=150", help="training steps per size (batch 16 x 64 tokens each)")
    p.add_argument("--optimizers", default=None, help="comma-separated subset of " + ",".join(LABELS))
    p.add_argument("--grid", action="append", default=[], metavar="OPT=LR,LR,...", help="replace an optimizer's lr grid")
    p.add_argument("--badm-sweep", choices=["full", "coordinate"], default="full",
                   help="BADM: full lr x rho/sigma grid, or lr at --center-ratio then rho/sigma at the best lr")
    p.add_argument("--center-ratio", type=float, default=9.0)
    p.add_argument("--extra", action="append", default=[], metavar="OPT=LR[@RATIO]", help="extra seed-0 points")
    p.add_argument("--elementwise-lr", type=float, default=None, help="fix the lr of the tensors newton_schulz and "
                   "Muon do not orthogonalise (default: swept, from the best BADM normalized / AdamW lr)")
    p.add_argument("--seeds", type=int, default=2, help="seeds of each optimizer's best point")
    p.add_argument("--fixed", default="", help="comma-separated optimizers run at their grid only, never extended")
    p.add_argument("--extend", type=int, default=3, help="at most this many grid extensions per optimizer and axis")
    p.add_argument("--num-train", type=int, default=3000)
    p.add_argument("--num-eval", type=int, default=100)
    bc.add_run_args(p, "convergence", results=bc.RESULTS / "convergence")
    p.add_argument("--section", default=SECTION, help="the docs section (heading line) to write")
    p.add_argument("--shard", default=None, help="suffix of this process's result files (parallel processes)")
    p.add_argument("--no-figures", action="store_true", help="draw no plots")
    p.add_argument("--report-only", action="store_true", help="rebuild tables and plots from the results JSON")
    p.add_argument("--retime", action="store_true", help="re-run each best point (all seeds) together after the sweep")
    p.add_argument("--note", default=None, help="a sentence on how the runs narrowed the protocol")
    p.add_argument("--commands", default=None, help="with --report-only: the sweep commands to document")
    p.add_argument("--admm-vs-muon", action="store_true", help="the ADMM-vs-Muon study (results admm_vs_muon.json)")
    p.add_argument("--jobs", type=int, default=4, help="--admm-vs-muon: runs at once")
    a = p.parse_args(argv)
    a.command = a.commands or bc.command_line()
    a.steps = {k: int(v) for k, v in (kv.split("=") for kv in a.steps.split(","))}
    if a.admm_vs_muon:
        a.corpus = a.corpus or ["builtin", "stdlib_docs"]
        if a.results == bc.RESULTS / "convergence":
            a.results = bc.RESULTS / "admm_vs_muon.json"
        if a.smoke:
            bc.smoke_paths(a, "admm_vs_muon")
            a.corpus, a.sizes, a.seeds, a.num_train, a.num_eval, a.steps = ["builtin"], ["tiny"], 1, 60, 10, {"tiny": 4}
        bc.setup(a)
        return admm_vs_muon(a)
    a.fixed = [o for o in a.fixed.split(",") if o]
    a.optimizers = a.optimizers.split(",") if a.optimizers else available_optimizers()
    if unknown := [o for o in a.optimizers if o not in LABELS]:
        p.error(f"unknown optimizer(s) {unknown}; choose from {','.join(LABELS)}")
    a.grids, a.ratios = {k: list(v) for k, v in GRIDS.items()}, list(RATIOS)
    for spec in a.grid:
        name, values = spec.split("=", 1)
        a.grids[name] = [float(v) for v in values.split(",")]
    if a.smoke:
        bc.smoke_paths(a, "convergence")
        a.sizes, a.steps, a.num_train, a.num_eval, a.extend, a.no_write = ["tiny"], {"tiny": 4}, 100, 20, 1, False
        a.grids, a.ratios = {k: v[1:3] or v for k, v in GRIDS.items()}, [9.0]
    bc.setup(a)
    base = {**bc.BASE_RECIPE, "num_train_examples": a.num_train, "num_eval_examples": a.num_eval}
    corpora = corpora_of([bc.corpus(n, a.out_dir) for n in a.corpus or ["builtin"]], a.out_dir)
    sweep = Sweep(a, bc.Results.merged([]), base, corpora)
    suffix = ("" if a.device == "cpu" else f"-{a.device}") + (f"-{a.shard}" if a.shard else "")
    for corpus in corpora if not a.report_only else ():
        for size in a.sizes:
            sweep.results = bc.Results(a.results / f"{corpus}-{size}{suffix}.json")
            sweep.sweep(size, corpus)
            if a.retime:
                sweep.reseed(size, corpus, range(a.seeds), again=True)
    sweep.results = bc.Results.merged(sorted(a.results.glob("*.json")))
    try:
        rel = str(Path(a.results).resolve().relative_to(a.docs.parent.resolve())) + "/"
    except ValueError:
        rel = str(a.results)
    text, _ = report(sweep, list(corpora), a.sizes, a.docs.parent, rel, a.section,
                     figures=not (a.no_write or a.no_figures))
    bc.publish(a, a.section, text)


if __name__ == "__main__":
    main()
