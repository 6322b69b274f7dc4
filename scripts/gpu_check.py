"""The prepared GPU check (run it with ``bash scripts/gpu_check.sh``): four parts, each budgeted, each in its own
try/except, ``gpu.json`` rewritten after every part so that a failure or a timeout keeps the others' results.

(a) correctness on CUDA: BADM's foreach and single-tensor kernels agree for every preconditioner (none,
    second_moment, normalized, newton_schulz) in both modes (fused, per_sub_batch), and against the same
    steps on the CPU; a tiny GPT-2 trains under bf16 autocast through BADMTrainer (and torch's Muon through
    a plain Trainer) with finite, falling loss;
(b) ``optimizer.step()`` time at GPT-2 small's 124M parameters (random gradients, CUDA-synchronised,
    warm-up, interleaved rounds: ``scripts/bench_step.py``): AdamW(fused), AdamW(foreach), torch's Muon
    (+AdamW elsewhere, ``hf_badm.peers``), BADM none / normalized / newton_schulz (ns_dtype auto, which is
    bfloat16 on CUDA, and float32);
(c) Newton-Schulz in bfloat16 vs float32: the difference of the direction (torch's Muon iteration, and one
    BADM step with each ``ns_dtype`` when BADM has that option), its time, and its effect on a short
    training run's loss;
(d) a short convergence sweep (``scripts/bench_convergence.py --device cuda``): tiny and small GPT-2 on the
    built-in and stdlib_docs corpora, AdamW, Muon and BADM newton_schulz at rho/sigma 1 (= Muon), 3 and 9,
    a small lr grid each, 2 seeds of each best, one process per corpus, size and optimizer (in parallel on
    the one GPU), stopped at the budget.

Writes ``gpu.json``, ``gpu_check.md`` (the section for docs/benchmarks.md), ``convergence-gpu/`` and
``figures/`` under ``--out`` (default ``$OUT``, else docs/results; the section then goes straight into
docs/benchmarks.md). ``--dry-run``: tiny sizes on the CPU, about a minute (the suite runs it). ``--collect DIR``
copies a GPU run's files from DIR into docs/ and writes the section.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

SECTION = "## GPU check"
PRECONDITIONERS = ("none", "second_moment", "normalized", "newton_schulz")
MODES = ("fused", "per_sub_batch")
SWEEP_OPTIMIZERS = ("adamw_torch", "muon", "badm_ns_norm", "badm_ns_norm_r3", "badm_ns_norm_r9")
SWEEP_GRIDS = {"adamw_torch": "0.003,0.01,0.03", "muon": "0.01,0.03,0.1", "badm_ns_norm": "0.01,0.03,0.1",
               "badm_ns_norm_r3": "0.01,0.03,0.1", "badm_ns_norm_r9": "0.01,0.03,0.1"}


class Check:
    """The parts' results in one JSON file, saved after every part; each part has a deadline."""

    def __init__(self, out: Path, dry: bool, budget_s: float, device: str) -> None:
        self.out, self.dry, self.device = out, dry, device
        self.start = time.perf_counter()
        self.deadline = self.start + budget_s
        self.result: dict[str, Any] = {"machine": bc.machine(), "dry_run": dry, "device": device,
                                       "budget_s": budget_s, "command": bc.command_line(), "parts": {}}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self) -> None:
        self.result["elapsed_s"] = time.perf_counter() - self.start
        bc.write_json(self.out / "gpu.json", self.result)

    def part(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"status": "running"}
        self.result["parts"][name] = entry
        self.save()
        print(f"== {name} ({self.left():.0f} s left)", flush=True)
        try:
            entry.update(fn())
            entry["status"] = "ok" if entry.get("passed", True) else "failed"
        except Exception as err:  # noqa: BLE001 - one part's failure must not lose the others
            entry.update(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-4000:])
            print(traceback.format_exc(), flush=True)
        entry["seconds"] = time.perf_counter() - t0
        print(f"== {name}: {entry['status']} in {entry['seconds']:.1f} s", flush=True)
        self.save()


def sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- (a) correctness

def badm_groups(params: list, precond: str) -> list[dict[str, Any]]:
    """newton_schulz: hidden matrices, then the first tensor (an 'embedding') and the 1-D ones with normalized,
    as ``hf_badm.badm_param_groups`` builds them; the other preconditioners: one group."""
    if precond != "newton_schulz":
        return [{"params": params}]
    hidden = [p for i, p in enumerate(params) if p.dim() == 2 and i > 0]
    rest = [p for i, p in enumerate(params) if p.dim() != 2 or i == 0]
    return [{"params": hidden}, {"params": rest, "preconditioner": "normalized", "sigma": 10.0, "rho": 90.0}]


def badm_kwargs(precond: str, ns_dtype: str | None) -> dict[str, Any]:
    lr = {"none": 0.3, "second_moment": 10.0, "normalized": 3e-3, "newton_schulz": 0.03}[precond]
    kw: dict[str, Any] = {"lr": lr, "preconditioner": precond}
    if precond == "newton_schulz" and ns_dtype and "ns_dtype" in inspect.signature(_badm().__init__).parameters:
        kw["ns_dtype"] = ns_dtype
    return kw


def _badm():
    from hf_badm import BADM

    return BADM


def run_badm(device: str, precond: str, mode: str, foreach: bool, shapes: list[tuple[int, ...]], steps: int = 5,
             ns_dtype: str | None = "float32") -> list:
    """``steps`` BADM steps from fixed parameters and gradients (per_sub_batch: 3 weighted sub-batches a step)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(device)) for s in shapes]
    opt = _badm()(badm_groups(params, precond), mode=mode, foreach=foreach, **badm_kwargs(precond, ns_dtype))
    weights = (0.2, 0.3, 0.5)
    for _ in range(steps):
        for w in weights if mode == "per_sub_batch" else (1.0,):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) * 0.01).to(device)
            if mode == "per_sub_batch":
                opt.absorb_sub_batch(w)
        opt.step()
    return [p.detach().to("cpu", torch.float64) for p in params]


def rel_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)) for x, y in zip(a, b))


def kernels(device: str, dry: bool) -> dict[str, Any]:
    """foreach vs single-tensor on ``device`` (must agree to 1e-5 relative, newton_schulz 1e-4: batched and
    per-matrix products may round differently; Newton-Schulz in float32 when BADM has ns_dtype) and ``device``
    vs CPU (reported)."""
    shapes = [(40, 16), (16, 48), (48, 16), (16,), (48,), (64, 16), (16, 16)] if dry else \
             [(512, 64), (64, 192), (64, 64), (64,), (192,), (64, 256), (256, 64), (256,)]
    rows, passed = [], True
    for precond in PRECONDITIONERS:
        for mode in MODES:
            fe = run_badm(device, precond, mode, True, shapes)
            single = run_badm(device, precond, mode, False, shapes)
            cpu = run_badm("cpu", precond, mode, False, shapes)
            d_fe, d_cpu = rel_diff(fe, single), rel_diff(single, cpu)
            ok = d_fe <= (1e-4 if precond == "newton_schulz" else 1e-5) and math.isfinite(d_cpu)
            passed &= ok
            rows.append({"preconditioner": precond, "mode": mode, "foreach_vs_single": d_fe, "device_vs_cpu": d_cpu,
                         "ok": ok})
            print(f"  {precond:<14} {mode:<14} foreach vs single {d_fe:.2e}  {device} vs cpu {d_cpu:.2e}", flush=True)
    return {"kernels": rows, "passed": passed}


def train_tiny(out: Path, device: str, steps: int, optimizer: str, precond: str = "none", mode: str = "fused",
               lr: float = 0.3, bf16: bool = True, extra: dict[str, Any] | None = None) -> list[float]:
    """Training losses of a tiny GPT-2 on the chain data: BADMTrainer (``optimizer="badm"``), or a plain Trainer
    with ``optimizers=create_muon_optimizer`` (``"muon"``) or ``create_badm_optimizer(**extra)`` (``"plain"``)."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from hf_badm import BADMConfig, BADMTrainer, create_badm_optimizer
    from hf_badm.peers import create_muon_optimizer

    from tests.tiny import chain_dataset, tiny_model  # the suite's tiny GPT-2 and learnable token chains

    args = TrainingArguments(output_dir=str(out), use_cpu=device == "cpu", bf16=bf16, report_to=[], max_steps=steps,
                             per_device_train_batch_size=8, learning_rate=lr, lr_scheduler_type="constant",
                             logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
                             max_grad_norm=1.0)
    model, data = tiny_model("gpt2"), chain_dataset(512)
    if optimizer == "badm":
        cfg = BADMConfig(preconditioner=precond, mode=mode,
                         sub_batches_per_micro_batch=2 if mode == "per_sub_batch" else 1)
        trainer = BADMTrainer(model=model, args=args, train_dataset=data, badm_config=cfg)
    elif optimizer == "muon":
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          optimizers=create_muon_optimizer(model, args, **(extra or {})))
    else:
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          optimizers=create_badm_optimizer(model, args, preconditioner=precond, **(extra or {})))
    trainer.remove_callback(PrinterCallback)  # the losses are read from the log history
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def bf16_training(device: str, dry: bool, out: Path) -> dict[str, Any]:
    """bf16 autocast through BADMTrainer (and torch's Muon through a plain Trainer): loss finite and falling."""
    steps = 4 if dry else 40
    cases = [("badm", "none", "fused", 0.3), ("badm", "none", "per_sub_batch", 0.3),
             ("badm", "normalized", "fused", 3e-3), ("badm", "newton_schulz", "fused", 0.03),
             ("badm", "newton_schulz", "per_sub_batch", 0.03), ("muon", "-", "fused", 0.03)]
    rows, passed = [], True
    for optimizer, precond, mode, lr in cases:
        extra = {"adamw_lr": 1e-2} if optimizer == "muon" else None  # no warm-up here: AdamW at 0.1 jumps at first
        losses = train_tiny(out / f"bf16-{optimizer}-{precond}-{mode}", device, steps, optimizer, precond, mode, lr,
                            extra=extra)
        first, last = statistics.mean(losses[:3]), statistics.mean(losses[-3:])
        finite = all(math.isfinite(x) for x in losses)
        ok = finite and (dry or last < 0.9 * first)
        passed &= ok
        rows.append({"optimizer": optimizer, "preconditioner": precond, "mode": mode, "lr": lr, "steps": steps,
                     "first_loss": first, "last_loss": last, "finite": finite, "ok": ok})
        print(f"  {optimizer} {precond} {mode}: loss {first:.3f} -> {last:.3f}", flush=True)
    return {"bf16_training": rows, "passed": passed}


def correctness(check: Check, out: Path) -> dict[str, Any]:
    a = kernels(check.device, check.dry)
    b = bf16_training(check.device, check.dry, out)
    return {**a, **b, "passed": a["passed"] and b["passed"]}


# ----------------------------------------------------------------------------- (b) step time

def step_time(check: Check) -> dict[str, Any]:
    import bench_step as bs

    keys = ["adamw_fused" if check.device == "cuda" else "adamw", "adamw", "muon", "badm", "badm_norm", "badm_ns"]
    keys = list(dict.fromkeys(keys + (["badm_ns_float32"] if "badm_ns_float32" in bs.OPTIMIZERS else [])))
    shapes = bs.gpt2_like_shapes(0.2) if check.dry else bs.gpt2_small_shapes()
    repeats, warmup = (3, 1) if check.dry else (20, 3)
    rows = bs.rows(bs.measure(shapes, keys, check.device, repeats, warmup))
    table = bs.table(rows)
    print(table, flush=True)
    return {"params": sum(math.prod(s) for s in shapes), "tensors": len(shapes), "repeats": repeats, "warmup": warmup,
            "rows": rows, "table": table}


# ----------------------------------------------------------------------------- (c) Newton-Schulz precision

def newton_schulz(x, dtype, steps: int = 5):
    """torch.optim.Muon's iteration (quintic, coefficients 3.4445, -4.7750, 2.0315) in ``dtype``."""
    a, b, c = 3.4445, -4.7750, 2.0315
    y = x.to(dtype)
    tall = y.size(0) > y.size(1)
    if tall:
        y = y.T
    y = y / y.norm().clamp(min=1e-7)
    for _ in range(steps):
        g = y @ y.T
        y = a * y + (b * g + c * g @ g) @ y
    return (y.T if tall else y).float()


def timed(fn: Callable[[], Any], reps: int) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps * 1e3


def ns_precision(check: Check, out: Path) -> dict[str, Any]:
    import torch

    dev, dry = check.device, check.dry
    d = 48 if dry else 768
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]
    gen = torch.Generator().manual_seed(0)
    iteration = []
    for s in shapes:
        x = torch.randn(s, generator=gen).to(dev)
        lo, hi = newton_schulz(x, torch.bfloat16), newton_schulz(x, torch.float32)
        row = {"shape": list(s), "rel_diff_fro": float((lo - hi).norm() / hi.norm()),
               "ms_bfloat16": timed(lambda: newton_schulz(x, torch.bfloat16), 3 if dry else 20),
               "ms_float32": timed(lambda: newton_schulz(x, torch.float32), 3 if dry else 20)}
        iteration.append(row)
        print(f"  NS {s}: |bf16 - fp32| / |fp32| = {row['rel_diff_fro']:.3e}, {row['ms_bfloat16']:.3f} vs "
              f"{row['ms_float32']:.3f} ms", flush=True)
    result: dict[str, Any] = {"iteration": iteration}
    has = "ns_dtype" in inspect.signature(_badm().__init__).parameters
    result["badm_has_ns_dtype"] = has
    if not has:
        result["badm"] = "skipped: this BADM has no ns_dtype option"
        return result
    deltas, ms = {}, {}
    for dtype in ("bfloat16", "float32"):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(1)).to(dev) * 0.02)
                  for s in shapes]
        start = [p.detach().clone() for p in params]
        grads = [torch.randn(s, generator=torch.Generator().manual_seed(2)).to(dev) * 0.01 for s in shapes]
        opt = _badm()(params, lr=0.03, preconditioner="newton_schulz", ns_dtype=dtype)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        deltas[dtype] = [p.detach() - s0 for p, s0 in zip(params, start)]

        def again(opt=opt, params=params, grads=grads) -> None:
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()

        ms[dtype] = timed(again, 3 if dry else 20)
    result["badm_step"] = {"rel_diff_of_update": max(float((a - b).norm() / b.norm())
                                                      for a, b in zip(deltas["bfloat16"], deltas["float32"])),
                           "ms_bfloat16": ms["bfloat16"], "ms_float32": ms["float32"]}
    print(f"  BADM step: update |bf16 - fp32| / |fp32| = {result['badm_step']['rel_diff_of_update']:.3e}", flush=True)
    steps = 4 if dry else 150
    losses = {dtype: train_tiny(out / f"ns-{dtype}", dev, steps, "plain", "newton_schulz", lr=0.03, bf16=False,
                                extra={"ns_dtype": dtype}) for dtype in ("bfloat16", "float32")}
    result["training"] = {"steps": steps, **{f"final_loss_{k}": statistics.mean(v[-5:]) for k, v in losses.items()}}
    print(f"  training {steps} steps: final loss bf16 {result['training']['final_loss_bfloat16']:.4f}, fp32 "
          f"{result['training']['final_loss_float32']:.4f}", flush=True)
    return result


# ----------------------------------------------------------------------------- (d) convergence sweep

def convergence(check: Check, out: Path, work: Path, corpora: list[str]) -> dict[str, Any]:
    """One bench_convergence process per corpus, size and optimizer (independent: the elementwise lr is fixed),
    all at once on the device, killed at the deadline; then one report over whatever finished."""
    results = out / "convergence-gpu"
    dev = check.device
    if check.dry:
        sizes, steps, opts, common = ["tiny"], "tiny=2", ["adamw_torch", "muon"], [
            "--num-train", "50", "--num-eval", "10", "--seeds", "1", "--extend", "0"]
        grids = {"adamw_torch": "0.01", "muon": "0.03"}
    else:
        sizes, steps, opts, common, grids = ["tiny", "small"], "tiny=300,small=150", list(SWEEP_OPTIMIZERS), [
            "--seeds", "2", "--extend", "1"], SWEEP_GRIDS
    from hf_badm.app.data import load_text_dataset

    specs, skipped = {}, {}
    for c in corpora:  # once, before the processes that read them start; a corpus that fails is left out
        try:
            spec = bc.corpus(c, work)
            bc.benchmark_tokenizer(work, spec)
            if spec != "builtin":
                load_text_dataset(spec)  # fills the datasets cache
            specs[bc.corpus_name(spec)] = spec
        except Exception as err:  # noqa: BLE001 - e.g. a Python without sys.stdlib_module_names (< 3.10)
            skipped[c] = f"{type(err).__name__}: {err}"
            print(f"  corpus {c} left out: {skipped[c]}", flush=True)
    base = [sys.executable, str(bc.ROOT / "scripts" / "bench_convergence.py"), "--device", dev, "--threads", "1",
            "--steps", steps, "--elementwise-lr", "0.1", "--results", str(results), "--out-dir", str(work),
            "--no-write", "--docs", str(work / "unused.md"), *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = []
    for corpus in specs:
        for size in sizes:
            for o in opts:
                cmd = [*base, "--corpus", corpus, "--sizes", size, "--optimizers", o, "--grid", f"{o}={grids[o]}",
                       "--shard", o]
                log = (work / "logs" / f"{corpus}-{size}-{o}.log")
                log.parent.mkdir(parents=True, exist_ok=True)
                procs.append((f"{corpus}/{size}/{o}", subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                                                      env=env, start_new_session=True), log))
    report_reserve = 25 if check.dry else 45
    status = {}
    while any(p.poll() is None for _, p, _ in procs) and check.left() > report_reserve:
        time.sleep(1)
    for name, p, log in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)  # its own session: the process and any children it started
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            status[name] = "stopped at the budget"
        else:
            status[name] = "done" if p.returncode == 0 else f"exit {p.returncode}: {log.read_text()[-600:]}"
    print("  " + "\n  ".join(f"{k}: {v}" for k, v in status.items()), flush=True)
    import bench_convergence as bcv

    section = "### Convergence on the GPU: AdamW, Muon and BADM newton_schulz at rho/sigma 1, 3, 9"
    md = out / "convergence-gpu.md"
    md.write_text("")  # the report adds its section to this file
    bcv.main(["--report-only", *sum((["--corpus", c] for c in specs), []), "--sizes", *sizes, "--steps", steps,
              "--optimizers", ",".join(opts), "--elementwise-lr", "0.1", "--device", dev, "--results", str(results),
              "--out-dir", str(work), "--docs", str(md), "--section", section, *common,
              "--commands", "bash scripts/gpu_check.sh (part d)", "--note",
              "Each corpus, size and optimizer ran in its own process, all at once on the one device and stopped at "
              "the check's time budget (a sweep cut short shows fewer points or seeds): the wall-clock columns were "
              "measured under that contention; compare steps."])
    runs = [r for f in sorted(results.glob("*.json")) for r in json.loads(f.read_text())["runs"]]
    return {"processes": status, "corpora_left_out": skipped, "runs": len(runs), "markdown": md.read_text().strip() if md.exists() else None,
            "passed": bool(runs)}


# ----------------------------------------------------------------------------- markdown

def markdown(result: dict[str, Any]) -> str:
    meta, parts = result["machine"], result["parts"]
    lines = [f"{SECTION}\n",
             "`bash scripts/gpu_check.sh` on one GPU: CUDA correctness, optimizer step time at GPT-2 small's 124M "
             "parameters, Newton-Schulz in bfloat16 vs float32, and a short convergence sweep; every number below "
             "is in [`results/gpu.json`](results/gpu.json)"
             + (" (this is a CPU dry run: tiny sizes, no GPU numbers)" if result.get("dry_run") else "") + ".\n",
             bc.stamp(meta, "bash scripts/gpu_check.sh"),
             f"- parts: " + ", ".join(f"{k} {v['status']} ({v.get('seconds', 0):.0f} s)" for k, v in parts.items()) + "\n"]
    a = parts.get("correctness", {})
    if a.get("kernels"):
        lines += ["### Correctness\n", "| preconditioner | mode | foreach vs single-tensor (max rel.) | "
                  f"{result['device']} vs CPU (max rel.) | ok |", "|---|---|---:|---:|---|"]
        lines += [f"| {r['preconditioner']} | {r['mode']} | {r['foreach_vs_single']:.1e} | {r['device_vs_cpu']:.1e} "
                  f"| {'yes' if r['ok'] else 'NO'} |" for r in a["kernels"]]
        lines.append("\n5 steps from the same parameters and gradients (per_sub_batch: 3 weighted sub-batches a step); "
                     "newton_schulz in float32 where BADM has `ns_dtype`.\n")
    if a.get("bf16_training"):
        lines += ["| bf16 autocast, tiny GPT-2 | mode | lr | steps | loss first 3 → last 3 | ok |", "|---|---|---:|---:|---|---|"]
        lines += [f"| {r['optimizer']} {r['preconditioner']} | {r['mode']} | {r['lr']:g} | {r['steps']} | "
                  f"{r['first_loss']:.3f} → {r['last_loss']:.3f} | {'yes' if r['ok'] else 'NO'} |" for r in a["bf16_training"]]
        lines.append("")
    b = parts.get("step_time", {})
    if b.get("table"):
        lines += [f"### Optimizer step at {b['params'] / 1e6:.1f}M parameters ({b['tensors']} tensors)\n",
                  f"Random gradients, CUDA-synchronised, {b['warmup']} warm-up and {b['repeats']} interleaved rounds "
                  "(`scripts/bench_step.py --shapes gpt2_small --device cuda`).\n", b["table"], ""]
    c = parts.get("ns_dtype", {})
    if c.get("iteration"):
        lines += ["### Newton-Schulz: bfloat16 vs float32\n", "| matrix | relative difference of the direction | "
                  "ms bf16 | ms fp32 |", "|---|---:|---:|---:|"]
        lines += [f"| {r['shape'][0]} x {r['shape'][1]} | {r['rel_diff_fro']:.2e} | {r['ms_bfloat16']:.3f} | "
                  f"{r['ms_float32']:.3f} |" for r in c["iteration"]]
        if c.get("badm_step"):
            s = c["badm_step"]
            lines.append(f"\nOne BADM newton_schulz step, `ns_dtype` bfloat16 vs float32: relative difference of the "
                         f"update {s['rel_diff_of_update']:.2e}; {s['ms_bfloat16']:.2f} vs {s['ms_float32']:.2f} ms.")
        if c.get("training"):
            t = c["training"]
            lines.append(f"Tiny GPT-2, {t['steps']} steps (mean of the last 5 logged losses): bfloat16 "
                         f"{t['final_loss_bfloat16']:.4f}, float32 {t['final_loss_float32']:.4f}.")
        if c.get("badm"):
            lines.append(f"\nBADM: {c['badm']}.")
        lines.append("")
    d = parts.get("convergence", {})
    if d.get("markdown"):
        lines += [d["markdown"], ""]
    for name, v in parts.items():
        if v["status"] not in ("ok",):
            lines.append(f"- {name}: **{v['status']}**" + (f" ({v['error']})" if v.get("error") else ""))
    return "\n".join(lines).rstrip() + "\n"


def publish(src: Path) -> None:
    """Put a run's files into docs/: ``gpu.json`` and ``convergence-gpu/`` into docs/results, figures into
    docs/figures, the section into docs/benchmarks.md (``src``: the run's output, e.g. the device's ``$OUT``)."""
    if src.resolve() != bc.RESULTS.resolve():
        shutil.copy2(src / "gpu.json", bc.RESULTS / "gpu.json")
        if (src / "convergence-gpu").is_dir():
            shutil.copytree(src / "convergence-gpu", bc.RESULTS / "convergence-gpu", dirs_exist_ok=True)
    if (src / "figures").is_dir():
        for fig in (src / "figures").iterdir():
            (bc.ROOT / "docs" / "figures").mkdir(exist_ok=True)
            (shutil.move if src.resolve() == bc.RESULTS.resolve() else shutil.copy2)(fig, bc.ROOT / "docs" / "figures" / fig.name)
    md = markdown(json.loads((src / "gpu.json").read_text()))
    md = md.replace("[`convergence-gpu/`](convergence-gpu/)", "[`results/convergence-gpu/`](results/convergence-gpu/)")
    bc.write_section(bc.DOCS, SECTION, md)
    print(f"wrote '{SECTION}' of {bc.DOCS} from {src}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (seconds); writes under a temp dir")
    p.add_argument("--out", type=Path, default=None, help="output directory (default $OUT, else docs/results)")
    p.add_argument("--budget-s", type=float, default=None, help="total seconds (default 450; dry run 150)")
    p.add_argument("--parts", default="correctness,step_time,ns_dtype,convergence")
    p.add_argument("--corpora", default="builtin,stdlib_docs", help="corpora of the convergence sweep")
    p.add_argument("--collect", type=Path, default=None, metavar="DIR", help="copy a GPU run's output into docs/")
    a = p.parse_args(argv)
    if a.collect:
        publish(a.collect)
        return 0
    bc.quiet()
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device (torch " + torch.__version__ + ", built for CUDA "
              + str(torch.version.cuda) + "); use --dry-run for the CPU check", file=sys.stderr)
        return 2
    device = "cpu" if a.dry_run else "cuda"
    out = a.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else
                    Path(tempfile.mkdtemp(prefix="gpu-check-dry-")) if a.dry_run else bc.RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-work-"))
    check = Check(out, a.dry_run, a.budget_s or (150.0 if a.dry_run else 450.0), device)
    print(f"gpu_check: {device}{' (' + torch.cuda.get_device_name(0) + ')' if device == 'cuda' else ''}, output {out}, "
          f"budget {check.left():.0f} s", flush=True)
    parts = a.parts.split(",")
    if "correctness" in parts:
        check.part("correctness", lambda: correctness(check, work))
    if "step_time" in parts:
        check.part("step_time", lambda: step_time(check))
    if "ns_dtype" in parts:
        check.part("ns_dtype", lambda: ns_precision(check, work))
    if "convergence" in parts:
        check.part("convergence", lambda: convergence(check, out, work, a.corpora.split(",")))
    md = markdown(check.result)
    (out / "gpu_check.md").write_text(md)
    if out.resolve() == bc.RESULTS.resolve():
        publish(out)
    print(md)
    print(f"gpu_check: wrote {out / 'gpu.json'} and {out / 'gpu_check.md'} in {time.perf_counter() - check.start:.0f} s")
    return 0 if all(v["status"] == "ok" for v in check.result["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
