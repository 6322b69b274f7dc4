"""Where could the ADMM part of BADM add to Muon? Fused ``newton_schulz`` at rho = sigma is Muon on the hidden
matrices (docs/preconditioners.md); this study runs the settings where BADM differs from Muon, against Muon, at the
learning rates the convergence sweeps found best (``scripts/bench_convergence.py``, docs/benchmarks.md):

- ``muon``: torch's Muon on the hidden matrices, AdamW (lr 0.1) on the rest (``hf_badm.peers``);
- ``ns``: BADM newton_schulz at rho = sigma (Muon on the matrices), ``normalized`` BADM on the rest (lr 0.1);
- ``ns_r3``: the same with rho = 3 sigma (the dual as quasi-hyperbolic momentum over orthogonalised directions);
- ``ns_s2``, ``ns_s4``, ``ns_s8``: per-sub-batch newton_schulz (PISA's NSISA): S sub-batches per step, each
  orthogonalising its own momentum, the duals averaging the local solutions (the paper's consensus);

at batch 16 and at batch 64 (the regime where averaging local solutions should matter most), on the built-in
corpus and on ``stdlib_docs`` (real prose gathered at run time), tiny and small GPT-2, 2 seeds each. Every run is
one process; ``--jobs`` of them run at once (on a GPU: all on the one device).

    python scripts/bench_admm_vs_muon.py --device cuda --jobs 12            # writes docs/results, docs section
    python scripts/bench_admm_vs_muon.py --smoke                            # seconds, CPU, temporary directory
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
import bench_convergence as bcv  # noqa: E402

SECTION = "## Where ADMM could add to Muon: rho != sigma, per-sub-batch NSISA, larger batches"
ARMS: dict[str, tuple[str, dict[str, Any]]] = {  # name -> (bench_convergence optimizer, recipe changes)
    "muon": ("muon", {}),
    "ns": ("badm_ns_norm", {}),
    "ns_r3": ("badm_ns_norm_r3", {}),
    "ns_s2": ("badm_ns_norm_s4", {"sub_batches_per_micro_batch": 2}),
    "ns_s4": ("badm_ns_norm_s4", {}),
    "ns_s8": ("badm_ns_norm_s4", {"sub_batches_per_micro_batch": 8}),
}
RATIO = {"ns_r3": 3.0}
LABELS = {"muon": "Muon (torch, AdamW elsewhere)", "ns": "newton_schulz, rho = sigma (Muon on the matrices)",
          "ns_r3": "newton_schulz, rho = 3 sigma", "ns_s2": "newton_schulz per-sub-batch S=2",
          "ns_s4": "newton_schulz per-sub-batch S=4", "ns_s8": "newton_schulz per-sub-batch S=8"}
# The matrix learning rate of each corpus and size: the best of Muon's and newton_schulz's sweeps on the GPU
# (docs/benchmarks.md, "GPU check"); the elementwise tensors take lr 0.1 in every arm.
LR = {("builtin", "tiny"): 0.03, ("builtin", "small"): 0.03, ("stdlib_docs", "tiny"): 0.01,
      ("stdlib_docs", "small"): 0.01}
BATCH_ARMS = {16: ["muon", "ns", "ns_r3", "ns_s2", "ns_s4", "ns_s8"], 64: ["muon", "ns", "ns_s4", "ns_s8"]}
STEPS = {"tiny": 300, "small": 150}


def plan(a: argparse.Namespace, work: Path) -> list[tuple[str, dict[str, Any]]]:
    runs = []
    for corpus in a.corpus:
        spec = bc.corpus(corpus, work)
        tokenizer = bc.benchmark_tokenizer(work, spec)
        base = {**bc.BASE_RECIPE, "num_train_examples": a.num_train, "num_eval_examples": a.num_eval}
        for size in a.sizes:
            for batch, arms in BATCH_ARMS.items():
                for arm in arms:
                    for seed in range(a.seeds):
                        opt, changes = ARMS[arm]
                        lr = LR[(corpus, size)]
                        _, r = bcv.recipe(opt, lr, RATIO.get(arm, 1.0), seed, size, corpus, a.steps[size], base, work,
                                          spec, tokenizer, elementwise_lr=0.1, device=a.device)
                        r.update(changes, per_device_train_batch_size=batch, overwrite_output_dir=True,
                                 output_dir=str(work / "runs" / f"{corpus}-{size}-b{batch}-{arm}-s{seed}"))
                        runs.append((f"{corpus}|{size}|{batch}|{arm}|{seed}", r))
    return runs


def run_one(key: str, recipe: dict[str, Any], work: Path) -> dict[str, Any]:
    """One run in its own process (clean device memory, true parallelism)."""
    spec = work / "specs" / f"{key.replace('|', '_')}.json"
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps(recipe))
    done = subprocess.run([sys.executable, __file__, "--worker", str(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        return {"key": key, "error": done.stderr[-2000:]}
    return {"key": key, **json.loads(spec.with_suffix(".out.json").read_text())}


def report(rows: list[dict[str, Any]], a: argparse.Namespace, machine: dict[str, str], command: str) -> str:
    by: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        if "error" not in r:
            corpus, size, batch, arm, _ = r["key"].split("|")
            by.setdefault((corpus, size, int(batch), arm), []).append(r)
    lines = []
    for corpus in a.corpus:
        for size in a.sizes:
            for batch, arms in BATCH_ARMS.items():
                muon = by.get((corpus, size, batch, "muon"), [])
                if not muon:
                    continue
                target = statistics.mean(r["final_eval_loss"] for r in muon)  # reached by Muon at its budget
                lines += [f"\n#### {corpus}, GPT-2 {size}, batch {batch} ({a.steps[size]} steps, matrix lr "
                          f"{LR[(corpus, size)]:g}); Muon's final eval loss {target:.4f}\n",
                          "| setting | final eval loss, mean (min–max) | steps to Muon's final loss | speed-up vs Muon "
                          "(steps) | s/step |", "|---|---|---:|---:|---:|"]
                for arm in arms:
                    rs = by.get((corpus, size, batch, arm), [])
                    if arm == "muon":
                        losses = [r["final_eval_loss"] for r in rs]
                        lines.append(f"| {LABELS[arm]} | {statistics.mean(losses):.4f} ({min(losses):.4f}–"
                                     f"{max(losses):.4f}) | {a.steps[size]} (by definition) | 1.00x | "
                                     f"{statistics.mean(r['s_per_step'] for r in rs):.3f} |")
                        continue
                    if not rs:
                        lines.append(f"| {LABELS[arm]} | failed or not run | | | |")
                        continue
                    losses = [r["final_eval_loss"] for r in rs]
                    reached = [bc.steps_to_reach(r["curve"], target) for r in rs]
                    hit = [s for s in reached if s is not None]
                    steps = statistics.mean(hit) if hit else None
                    speed = f"{a.steps[size] / steps:.2f}x" if steps else "not reached"
                    lines.append(f"| {LABELS[arm]} | {statistics.mean(losses):.4f} ({min(losses):.4f}–{max(losses):.4f})"
                                 f" | {bc.fmt(steps, '.0f')}{'' if len(hit) in (0, len(rs)) else f' ({len(hit)}/{len(rs)} seeds)'}"
                                 f" | {speed} | {statistics.mean(r['s_per_step'] for r in rs):.3f} |")
    errors = [r for r in rows if "error" in r]
    head = (f"{SECTION}\n\nAt rho = sigma, fused `newton_schulz` is Muon on the hidden matrices (tested to 1e-12 against "
            "a literal Muon), so BADM can add to Muon only where it differs: rho != sigma, per-sub-batch slots (each "
            "sub-batch orthogonalises its own momentum and the duals average the local solutions: PISA's NSISA), "
            "and the elementwise tensors (`normalized` BADM where Muon users take AdamW). Each setting ran at the "
            "learning rates the convergence sweeps found best (matrix lr per corpus and size below; elementwise lr "
            f"0.1 in every arm), {a.seeds} seeds, block 64, cosine schedule with 20 warm-up steps, clipping 1.0 "
            "(per-sub-batch: each sub-batch clipped on its own). Target: Muon's mean final eval loss, which Muon reaches "
            "at its budget by definition; speed-up = Muon's budget / the setting's steps to the target (interpolated "
            "between 10 evaluations, mean over the seeds that reached it); 'not reached' = the setting's final loss "
            "stayed above Muon's. All runs of a call ran at "
            "once on the one device, so s/step is measured under that contention.\n")
    tail = f"\n\n{len(errors)} run(s) failed: " + "; ".join(e["key"] for e in errors) if errors else ""
    return head + "\n".join(lines) + tail + "\n\n" + bc.stamp(machine, command)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--report-only", action="store_true", help="the table from the results JSON of an earlier run")
    bc.add_run_args(p, "admm_vs_muon", threads=None)
    p.add_argument("--corpus", nargs="+", default=list(bc.CORPORA))
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--jobs", type=int, default=4, help="runs at once")
    p.add_argument("--num-train", type=int, default=3000)
    p.add_argument("--num-eval", type=int, default=100)
    a = p.parse_args(argv)
    if a.worker:
        bc.quiet()
        spec = Path(a.worker)
        spec.with_suffix(".out.json").write_text(json.dumps(bc.train(json.loads(spec.read_text()))))
        return
    a.steps = dict(STEPS)
    if a.smoke:
        bc.smoke_paths(a, "admm_vs_muon")
        a.corpus, a.sizes, a.seeds, a.num_train, a.num_eval, a.steps = ["builtin"], ["tiny"], 1, 60, 10, {"tiny": 4}
    bc.setup(a)
    results = a.results if a.results.suffix == ".json" else a.results / "admm_vs_muon.json"
    if a.report_only:
        saved = json.loads(results.read_text())
        text = report(saved["rows"], a, saved["machine"], saved.get("command", "(not recorded)"))
        print(text)
        if not a.no_write:
            bc.write_section(a.docs, SECTION, text)
        return
    work = Path(a.out_dir)
    work.mkdir(parents=True, exist_ok=True)
    runs = plan(a, work)
    print(f"{len(runs)} runs, {a.jobs} at once", flush=True)
    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(a.jobs) as pool:  # results saved as runs finish: a cut-short call keeps what ran
        for done in as_completed([pool.submit(run_one, key, r, work) for key, r in runs]):
            rows.append(done.result())
            bc.write_json(results, {"machine": bc.machine(), "command": bc.command_line(), "rows": rows})
            print(f"{len(rows)}/{len(runs)} {rows[-1]['key']}", flush=True)
    text = report(rows, a, bc.machine(), bc.command_line())
    print(text)
    if not a.no_write:
        bc.write_section(a.docs, SECTION, text)


if __name__ == "__main__":
    main()
