"""The prepared GPU check (`bash scripts/gpu_check.sh`; docs/benchmarks.md, "GPU check"): (a) BADM's kernels on CUDA
and bf16 training, (b) step time at 124M parameters, (c) Newton-Schulz in bfloat16 vs float32, (d) a short convergence
sweep. Each part budgeted and caught on its own, gpu.json rewritten after each, so a failure keeps the others."""

from __future__ import annotations

import importlib.util
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
LR = {"none": 0.3, "second_moment": 10.0, "normalized": 3e-3, "newton_schulz": 0.03}
SWEEP_GRIDS = {"adamw_torch": "0.003,0.01,0.03", "muon": "0.01,0.03,0.1", "badm_ns_norm": "0.01,0.03,0.1",
               "badm_ns_norm_r3": "0.01,0.03,0.1", "badm_ns_norm_r9": "0.01,0.03,0.1"}
NEEDS = ("torch", "transformers", "accelerate", "datasets", "tokenizers")


class Check:
    """The parts' results in one JSON file, saved after every part; the parts share one deadline."""

    def __init__(self, out: Path, dry: bool, budget_s: float, device: str) -> None:
        self.out, self.dry, self.device, self.start = out, dry, device, time.perf_counter()
        self.deadline = self.start + budget_s
        self.result: dict[str, Any] = {"machine": bc.machine(), "dry_run": dry, "device": device,
                                       "budget_s": budget_s, "command": bc.command_line(), "parts": {}}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self) -> None:
        self.result["elapsed_s"] = time.perf_counter() - self.start
        bc.write_json(self.out / "gpu.json", self.result)

    def part(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        t0, entry = time.perf_counter(), {"status": "running"}
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


def run_badm(device: str, precond: str, mode: str, foreach: bool, shapes: list, steps: int = 5) -> list:
    """``steps`` BADM steps from fixed parameters and gradients (per_sub_batch: 3 weighted sub-batches a step);
    newton_schulz (in float32) on the matrices after the first tensor, normalized on the rest."""
    import torch

    from hf_badm import BADM

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(device)) for s in shapes]
    kw = {"mode": mode, "foreach": foreach, "lr": LR[precond]}
    opt = (bc.newton_schulz_badm(params, embeddings=1, ns_dtype="float32", **kw) if precond == "newton_schulz"
           else BADM(params, preconditioner=precond, **kw))
    for _ in range(steps):
        for w in (0.2, 0.3, 0.5) if mode == "per_sub_batch" else (1.0,):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) * 0.01).to(device)
            if mode == "per_sub_batch":
                opt.absorb_sub_batch(w)
        opt.step()
    return [p.detach().to("cpu", torch.float64) for p in params]


def rel_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)) for x, y in zip(a, b))


def train_tiny(out: Path, device: str, steps: int, optimizer: str, precond: str = "none", mode: str = "fused",
               lr: float = 0.3, bf16: bool = True, extra: dict[str, Any] | None = None) -> list[float]:
    """Training losses of the suite's tiny GPT-2 on token chains: BADMTrainer (``badm``), or a plain Trainer with
    torch's Muon (``muon``) or ``create_badm_optimizer(**extra)`` (``plain``)."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from hf_badm import BADMConfig, BADMTrainer, create_badm_optimizer
    from hf_badm.peers import create_muon_optimizer
    from tests.tiny import chain_dataset, tiny_model

    args = TrainingArguments(output_dir=str(out), use_cpu=device == "cpu", bf16=bf16, report_to=[], max_steps=steps,
                             per_device_train_batch_size=8, learning_rate=lr, lr_scheduler_type="constant",
                             logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
                             max_grad_norm=1.0)
    model, data = tiny_model("gpt2"), chain_dataset(512)
    if optimizer == "badm":
        cfg = BADMConfig(preconditioner=precond, mode=mode, sub_batches_per_micro_batch=1 + (mode == "per_sub_batch"))
        trainer = BADMTrainer(model=model, args=args, train_dataset=data, badm_config=cfg)
    else:
        make = (lambda: create_muon_optimizer(model, args, **(extra or {}))) if optimizer == "muon" else (
            lambda: create_badm_optimizer(model, args, preconditioner=precond, **(extra or {})))
        trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=make())
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def correctness(check: Check, out: Path) -> dict[str, Any]:
    """foreach vs single-tensor on the device (1e-5 relative; newton_schulz 1e-4: batched products round otherwise)
    and device vs CPU (reported); then bf16 autocast training with finite, falling loss."""
    dry, device = check.dry, check.device
    shapes = [(40, 16), (16, 48), (48, 16), (16,), (48,), (64, 16), (16, 16)] if dry else \
             [(512, 64), (64, 192), (64, 64), (64,), (192,), (64, 256), (256, 64), (256,)]
    kernels, training = [], []
    for precond in PRECONDITIONERS:
        for mode in ("fused", "per_sub_batch"):
            fe, single = (run_badm(device, precond, mode, f, shapes) for f in (True, False))
            d_fe, d_cpu = rel_diff(fe, single), rel_diff(single, run_badm("cpu", precond, mode, False, shapes))
            ok = d_fe <= (1e-4 if precond == "newton_schulz" else 1e-5) and math.isfinite(d_cpu)
            kernels.append({"preconditioner": precond, "mode": mode, "foreach_vs_single": d_fe, "device_vs_cpu": d_cpu,
                            "ok": ok})
            print(f"  {precond:<14} {mode:<14} foreach vs single {d_fe:.2e}  {device} vs cpu {d_cpu:.2e}", flush=True)
    steps = 4 if dry else 40
    for optimizer, precond, mode in (("badm", "none", "fused"), ("badm", "none", "per_sub_batch"),
                                     ("badm", "normalized", "fused"), ("badm", "newton_schulz", "fused"),
                                     ("badm", "newton_schulz", "per_sub_batch"), ("muon", "-", "fused")):
        lr = 0.03 if optimizer == "muon" else LR[precond]
        extra = {"adamw_lr": 1e-2} if optimizer == "muon" else None  # no warm-up here: AdamW at 0.1 jumps at first
        losses = train_tiny(out / f"bf16-{optimizer}-{precond}-{mode}", device, steps, optimizer, precond, mode, lr,
                            extra=extra)
        first, last = statistics.mean(losses[:3]), statistics.mean(losses[-3:])
        finite = all(math.isfinite(x) for x in losses)
        training.append({"optimizer": optimizer, "preconditioner": precond, "mode": mode, "lr": lr, "steps": steps,
                         "first_loss": first, "last_loss": last, "finite": finite,
                         "ok": finite and (dry or last < 0.9 * first)})
        print(f"  {optimizer} {precond} {mode}: loss {first:.3f} -> {last:.3f}", flush=True)
    return {"kernels": kernels, "bf16_training": training, "passed": all(r["ok"] for r in kernels + training)}


def step_time(check: Check) -> dict[str, Any]:
    import bench_step as bs

    keys = list(dict.fromkeys(["adamw_fused" if check.device == "cuda" else "adamw", "adamw", "muon", "badm",
                               "badm_norm", "badm_ns", "badm_ns_float32"]))
    shapes = bc.gpt2_like_shapes(0.2) if check.dry else bc.gpt2_small_shapes()
    repeats, warmup = (3, 1) if check.dry else (20, 3)
    rows = bs.rows(bs.measure(shapes, keys, check.device, repeats, warmup))
    print(table := bs.table(rows), flush=True)
    return {"params": sum(math.prod(s) for s in shapes), "tensors": len(shapes), "repeats": repeats, "warmup": warmup,
            "rows": rows, "table": table}


def ns_precision(check: Check, out: Path) -> dict[str, Any]:
    """The direction's difference and time in bfloat16 vs float32 (hf_badm's Newton-Schulz, torch's Muon quintic; one
    BADM step), and the effect on a short training run's loss."""
    import torch

    from hf_badm import BADM
    from hf_badm.optim.solves.newton_schulz import orthogonalised

    dev, reps, d = check.device, 3 if check.dry else 20, 48 if check.dry else 768
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]
    gen, iteration = torch.Generator().manual_seed(0), []
    for s in shapes:
        x = torch.randn(s, generator=gen).to(dev)
        lo, hi = (orthogonalised(x, dtype=t).float() for t in (torch.bfloat16, torch.float32))
        timing = {f"ms_{t}": statistics.median(bc.timed(lambda t=t: orthogonalised(x, dtype=getattr(torch, t)))
                                               for _ in range(reps)) * 1e3 for t in ("bfloat16", "float32")}
        iteration.append({"shape": list(s), "rel_diff_fro": float((lo - hi).norm() / hi.norm()), **timing})
        print(f"  NS {s}: |bf16 - fp32| / |fp32| = {iteration[-1]['rel_diff_fro']:.3e}", flush=True)
    deltas, ms = {}, {}
    for dtype in ("bfloat16", "float32"):
        params = bc.make_params(shapes, seed=1, device=dev)
        start = [p.detach().clone() for p in params]
        grads = [g.to(dev) for g in bc.make_params(shapes, seed=2, scale=0.01)]
        opt = BADM(params, lr=0.03, preconditioner="newton_schulz", ns_dtype=dtype)

        def step(opt=opt, params=params, grads=grads) -> None:
            for p, g in zip(params, grads):
                p.grad = g.detach()
            opt.step()

        step()
        deltas[dtype] = [p.detach() - s0 for p, s0 in zip(params, start)]
        ms[dtype] = statistics.median(bc.timed(step) for _ in range(reps)) * 1e3
    badm_step = {"rel_diff_of_update": max(float((a - b).norm() / b.norm()) for a, b in zip(*deltas.values())),
                 "ms_bfloat16": ms["bfloat16"], "ms_float32": ms["float32"]}
    steps = 4 if check.dry else 150
    losses = {t: train_tiny(out / f"ns-{t}", dev, steps, "plain", "newton_schulz", lr=0.03, bf16=False,
                            extra={"ns_dtype": t}) for t in ("bfloat16", "float32")}
    return {"iteration": iteration, "badm_has_ns_dtype": True, "badm_step": badm_step,
            "training": {"steps": steps, **{f"final_loss_{k}": statistics.mean(v[-5:]) for k, v in losses.items()}}}


def convergence(check: Check, out: Path, work: Path, corpora: list[str]) -> dict[str, Any]:
    """One bench_convergence process per corpus, size and optimizer (the elementwise lr fixed: independent), all at
    once on the device, stopped at the deadline; then one report over whatever finished."""
    from hf_badm.app.data import load_text_dataset

    results, dev = out / "convergence-gpu", check.device
    if check.dry:
        sizes, steps, grids = ["tiny"], "tiny=2", {"adamw_torch": "0.01", "muon": "0.03"}
        common = ["--num-train", "50", "--num-eval", "10", "--seeds", "1", "--extend", "0"]
    else:
        sizes, steps, grids, common = ["tiny", "small"], "tiny=300,small=150", SWEEP_GRIDS, ["--seeds", "2", "--extend", "1"]
    specs, skipped = {}, {}
    for c in corpora:  # gathered once, before the processes that read them start; one that fails is left out
        try:
            spec = bc.corpus(c, work)
            bc.benchmark_tokenizer(work, spec)
            if spec != "builtin":
                load_text_dataset(spec)  # fills the datasets cache
            specs[bc.corpus_name(spec)] = spec
        except Exception as err:  # noqa: BLE001 - e.g. a Python without sys.stdlib_module_names (< 3.10)
            skipped[c] = f"{type(err).__name__}: {err}"
    base = [sys.executable, str(bc.ROOT / "scripts" / "bench_convergence.py"), "--device", dev, "--threads", "1",
            "--steps", steps, "--elementwise-lr", "0.1", "--results", str(results), "--out-dir", str(work), *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs, status = [], {}
    for corpus, size, o in ((c, s, o) for c in specs for s in sizes for o in grids):
        log = work / "logs" / f"{corpus}-{size}-{o}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [*base, "--no-write", "--corpus", corpus, "--sizes", size, "--optimizers", o, "--grid", f"{o}={grids[o]}",
               "--shard", o]
        procs.append((f"{corpus}/{size}/{o}", subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                                              env=env, start_new_session=True), log))
    while any(p.poll() is None for _, p, _ in procs) and check.left() > (25 if check.dry else 45):
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
    import bench_convergence as bcv

    md = out / "convergence-gpu.md"
    md.write_text("")  # the report adds its section to this file
    bcv.main(["--report-only", *sum((["--corpus", c] for c in specs), []), "--sizes", *sizes, *base[2:],
              "--optimizers", ",".join(grids), "--docs", str(md), "--commands", "bash scripts/gpu_check.sh (part d)",
              "--section", "### Convergence on the GPU: AdamW, Muon and BADM newton_schulz at rho/sigma 1, 3, 9", "--note",
              "Each corpus, size and optimizer ran in its own process, all at once on the one device and stopped at "
              "the check's time budget (a sweep cut short shows fewer points or seeds): the wall-clock columns were "
              "measured under that contention; compare steps."])
    runs = [r for f in sorted(results.glob("*.json")) for r in json.loads(f.read_text())["runs"]]
    return {"processes": status, "corpora_left_out": skipped, "runs": len(runs), "markdown": md.read_text().strip(),
            "passed": bool(runs)}


def markdown(result: dict[str, Any]) -> str:
    parts, lines = result["parts"], [f"{SECTION}\n"]
    if result.get("dry_run"):
        lines.append("(this is a CPU dry run: tiny sizes, no GPU numbers)\n")
    lines += [bc.stamp(result["machine"], "bash scripts/gpu_check.sh"), "- parts: " + ", ".join(
        f"{k} {v['status']} ({v.get('seconds', 0):.0f} s)" for k, v in parts.items()) + "\n"]
    yes = {True: "yes", False: "NO"}
    if rows := parts.get("correctness", {}).get("kernels"):
        lines += ["### Correctness\n", *bc.md_table(
            ["preconditioner", "mode", "foreach vs single-tensor (max rel.)", f"{result['device']} vs CPU (max rel.)", "ok"],
            "llrrl", [[r["preconditioner"], r["mode"], f"{r['foreach_vs_single']:.1e}", f"{r['device_vs_cpu']:.1e}",
                       yes[r["ok"]]] for r in rows]), "\n5 steps from the same parameters and gradients (per_sub_batch: "
                  "3 weighted sub-batches a step); newton_schulz with ns_dtype float32.\n"]
    if rows := parts.get("correctness", {}).get("bf16_training"):
        lines += [*bc.md_table(["bf16 autocast, tiny GPT-2", "mode", "lr", "steps", "loss first 3 → last 3", "ok"], "llrrll",
                               [[f"{r['optimizer']} {r['preconditioner']}", r["mode"], f"{r['lr']:g}", r["steps"],
                                 f"{r['first_loss']:.3f} → {r['last_loss']:.3f}", yes[r["ok"]]] for r in rows]), ""]
    if (b := parts.get("step_time", {})).get("table"):
        lines += [f"### Optimizer step at {b['params'] / 1e6:.1f}M parameters ({b['tensors']} tensors)\n",
                  f"Random gradients, CUDA-synchronised, {b['warmup']} warm-up and {b['repeats']} interleaved rounds "
                  "(`scripts/bench_step.py --shapes gpt2_small --device cuda`).\n", b["table"], ""]
    if (c := parts.get("ns_dtype", {})).get("iteration"):
        s, t = c["badm_step"], c["training"]
        lines += ["### Newton-Schulz: bfloat16 vs float32\n", *bc.md_table(
            ["matrix", "relative difference of the direction", "ms bf16", "ms fp32"], "lrrr",
            [[f"{r['shape'][0]} x {r['shape'][1]}", f"{r['rel_diff_fro']:.2e}", f"{r['ms_bfloat16']:.3f}",
              f"{r['ms_float32']:.3f}"] for r in c["iteration"]]),
            f"\nOne BADM newton_schulz step, `ns_dtype` bfloat16 vs float32: relative difference of the update "
            f"{s['rel_diff_of_update']:.2e}; {s['ms_bfloat16']:.2f} vs {s['ms_float32']:.2f} ms.",
            f"Tiny GPT-2, {t['steps']} steps (mean of the last 5 logged losses): bfloat16 {t['final_loss_bfloat16']:.4f}, "
            f"float32 {t['final_loss_float32']:.4f}.", ""]
    if md := parts.get("convergence", {}).get("markdown"):
        lines += [md, ""]
    lines += [f"- {k}: **{v['status']}**" + (f" ({v['error']})" if v.get("error") else "")
              for k, v in parts.items() if v["status"] != "ok"]
    return "\n".join(lines).rstrip() + "\n"


def collect(src: Path) -> None:
    """A run's files into docs/ (``src``: its output, e.g. the device's ``$OUT``): gpu.json and convergence-gpu/ into
    docs/results, figures into docs/figures, the section (its prose kept) into docs/benchmarks.md."""
    here = src.resolve() == bc.RESULTS.resolve()
    if not here:
        shutil.copy2(src / "gpu.json", bc.RESULTS / "gpu.json")
        if (src / "convergence-gpu").is_dir():
            shutil.copytree(src / "convergence-gpu", bc.RESULTS / "convergence-gpu", dirs_exist_ok=True)
    for fig in (src / "figures").iterdir() if (src / "figures").is_dir() else ():
        (shutil.move if here else shutil.copy2)(fig, bc.ROOT / "docs" / "figures" / fig.name)
    md = markdown(json.loads((src / "gpu.json").read_text()))
    md = md.replace("[`convergence-gpu/`](convergence-gpu/)", "[`results/convergence-gpu/`](results/convergence-gpu/)")
    bc.write_section(bc.DOCS, SECTION, md, keep_intro=True)
    print(f"wrote '{SECTION}' of {bc.DOCS} from {src}")


def main(argv: list[str] | None = None) -> int:
    p = bc.parser(__doc__)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (about a minute), under a temp dir")
    p.add_argument("--out", type=Path, default=None, help="output directory (default $OUT, else docs/results)")
    p.add_argument("--budget-s", type=float, default=None, help="total seconds (default 450; dry run 150)")
    p.add_argument("--parts", default="correctness,step_time,ns_dtype,convergence")
    p.add_argument("--corpora", default="builtin,stdlib_docs", help="corpora of the convergence sweep")
    p.add_argument("--collect", type=Path, default=None, metavar="DIR", help="copy a GPU run's output into docs/")
    a = p.parse_args(argv)
    if missing := [m for m in NEEDS if importlib.util.find_spec(m) is None]:
        print(f"gpu_check: this Python ({sys.executable}) lacks {', '.join(missing)} (needed: {', '.join(NEEDS)}; "
              "matplotlib for the plots): install them or set PYTHON to an interpreter that has them", file=sys.stderr)
        return 3
    if a.collect:
        collect(a.collect)
        return 0
    bc.quiet()
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA device; --dry-run "
              "checks on the CPU", file=sys.stderr)
        return 2
    device = "cpu" if a.dry_run else "cuda"
    out = a.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else
                    Path(tempfile.mkdtemp(prefix="gpu-check-dry-")) if a.dry_run else bc.RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-work-"))
    check = Check(out, a.dry_run, a.budget_s or (150.0 if a.dry_run else 450.0), device)
    print(f"gpu_check: {device}{' (' + torch.cuda.get_device_name(0) + ')' if device == 'cuda' else ''}, torch "
          f"{torch.__version__}, output {out}, budget {check.left():.0f} s", flush=True)
    parts = {"correctness": lambda: correctness(check, work), "step_time": lambda: step_time(check),
             "ns_dtype": lambda: ns_precision(check, work),
             "convergence": lambda: convergence(check, out, work, a.corpora.split(","))}
    for name in a.parts.split(","):
        check.part(name, parts[name])
    (out / "gpu_check.md").write_text(md := markdown(check.result))
    if out.resolve() == bc.RESULTS.resolve():
        collect(out)
    print(md + f"\ngpu_check: wrote {out / 'gpu.json'} and {out / 'gpu_check.md'} in "
          f"{time.perf_counter() - check.start:.0f} s")
    return 0 if all(v["status"] == "ok" for v in check.result["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
