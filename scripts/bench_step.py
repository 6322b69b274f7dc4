"""Median ``optimizer.step()`` time and optimizer-state bytes: BADM (fused, per-sub-batch, preconditioned) vs AdamW and SGD.

Every optimizer updates its own copy of the same GPT-2-like float32 parameters (token and position
embeddings, per layer qkv/proj/fc/proj matrices with biases and layernorms) with the same fixed random
gradients on CPU. Repetitions are interleaved round-robin (the order rotates each round) so that clock
and thermal drift hit all optimizers equally; the table reports medians, IQRs and ratios vs AdamW.
The result is written as one section of docs/benchmarks.md, leaving the other sections untouched.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_common import write_section  # noqa: E402
from hf_badm import BADM  # noqa: E402

SECTION = "## Optimizer step: time and state memory"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SUB_BATCHES = 4
HEADER = "| optimizer | median ms | IQR ms | min ms | time / AdamW | state MiB | state / AdamW |"


def gpt2_like_shapes(params_millions: float) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style stack near the target size: the mix of a few huge matrices and
    many small vectors is what foreach kernels and per-tensor overheads see in practice."""
    target = params_millions * 1e6
    width = 64 * max(1, round(math.sqrt(target / 106) / 64))  # 106 d^2 ~ 6 layers + 32d vocab + 2d positions
    vocab, positions = 32 * width, 2 * width
    per_layer = 12 * width * width + 13 * width
    layers = max(1, round((target - (vocab + positions + 2) * width) / per_layer))
    d = width
    layer = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (positions, d)] + layer * layers + [(d,), (d,)]


def make_params(shapes: list[tuple[int, ...]], seed: int) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """All tensors an optimizer keeps per parameter (BADM's per-slot duals are a list of tensors)."""
    total = 0
    for state in opt.state.values():
        for value in state.values():
            for t in value if isinstance(value, list) else [value]:
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Case:
    """One optimizer on its own parameter copy; ``run`` does one step and records its timings."""

    def __init__(self, name: str, params: list[nn.Parameter], grads: list[torch.Tensor],
                 opt: torch.optim.Optimizer) -> None:
        self.name, self.params, self.grads, self.opt = name, params, grads, opt
        self.step_s: list[float] = []
        self.absorb_s: list[float] = []
        self.round_s: list[float] = []

    def set_grads(self) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad = g  # fixed, shared gradients: no optimizer here writes into p.grad

    def run(self, record: bool) -> None:
        absorbs = []
        if isinstance(self.opt, BADM) and self.opt.mode == "per_sub_batch":
            for _ in range(SUB_BATCHES):
                self.set_grads()  # absorb_sub_batch clears p.grad
                absorbs.append(timed(self.opt.absorb_sub_batch))
        else:
            self.set_grads()
        elapsed = timed(self.opt.step)
        if record:
            self.step_s.append(elapsed)
            self.absorb_s.extend(absorbs)
            self.round_s.append(sum(absorbs) + elapsed)


def newton_schulz_badm(params: list[nn.Parameter]) -> BADM:
    """The grouping of ``hf_badm.badm_param_groups``: hidden matrices orthogonalised; the two embedding
    tables (the first two tensors here) and all 1-D tensors take the elementwise defaults."""
    hidden = [p for i, p in enumerate(params) if p.dim() == 2 and i >= 2]
    rest = [p for i, p in enumerate(params) if p.dim() != 2 or i < 2]
    return BADM([{"params": hidden}, {"params": rest, "preconditioner": "normalized", "sigma": 10.0, "rho": 90.0}],
                lr=0.03, preconditioner="newton_schulz")


def build_cases(shapes: list[tuple[int, ...]], grads: list[torch.Tensor]) -> list[Case]:
    factories: list[tuple[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]]] = [
        ("BADM fused", lambda ps: BADM(ps, sigma=1000.0, rho=1500.0)),
        ("BADM per_sub_batch", lambda ps: BADM(ps, sigma=1000.0, rho=1500.0, mode="per_sub_batch")),
        ("BADM normalized", lambda ps: BADM(ps, lr=3e-3, preconditioner="normalized")),
        ("BADM newton_schulz (+ normalized elsewhere)", newton_schulz_badm),
        ("AdamW(foreach)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
        ("SGD(momentum=0.9, foreach)", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True)),
    ]
    cases = []
    for name, factory in factories:
        params = make_params(shapes, seed=0)
        cases.append(Case(name, params, grads, factory(params)))
    return cases


def summary_ms(samples: list[float]) -> str:
    """Median, IQR and minimum: contention on a shared CPU only ever adds time, so the minimum helps read
    a noisy run."""
    q1, med, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return f"{med * 1e3:.2f} | {(q3 - q1) * 1e3:.2f} | {min(samples) * 1e3:.2f}"


def table(cases: list[Case]) -> str:
    adamw = next(c for c in cases if c.name.startswith("AdamW"))
    ref_s = statistics.median(adamw.step_s)
    ref_bytes = state_bytes(adamw.opt)
    rows = [HEADER, "|---|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        nbytes = state_bytes(c.opt)
        label = f"{c.name} step()" if c.absorb_s else c.name
        rows.append(f"| {label} | {summary_ms(c.step_s)} | {statistics.median(c.step_s) / ref_s:.2f}x "
                    f"| {nbytes / 2**20:.1f} | {nbytes / ref_bytes:.2f}x |")
        if c.absorb_s:
            for label, samples in ((f"absorb_sub_batch() (each of {SUB_BATCHES})", c.absorb_s),
                                   (f"total: {SUB_BATCHES} absorbs + step()", c.round_s)):
                rows.append(f"| {c.name} {label} | {summary_ms(samples)} "
                            f"| {statistics.median(samples) / ref_s:.2f}x | (same state) | |")
    return "\n".join(rows)


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return found.group(1).strip() if found else platform.machine()


def section(command: str, n_params: int, n_tensors: int, repeats: int, result: str) -> str:
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    return (
        f"{SECTION}\n\n"
        f"Median wall time of one `optimizer.step()` and the bytes of optimizer state, all optimizers on "
        f"copies of the same {n_params / 1e6:.1f}M float32 parameters ({n_tensors} tensors, GPT-2-like "
        f"layer shapes) with the same fixed random gradients; {repeats} interleaved round-robin repetitions "
        f"after warm-up. BADM's step includes its NaN/Inf check of the gradients. `per_sub_batch` is timed "
        f"as {SUB_BATCHES} `absorb_sub_batch()` calls (each row: one call) followed by `step()`; its state is "
        f"{SUB_BATCHES} duals plus one aggregate per parameter. Ratios are of medians; other load on the CPU only "
        f"adds time, so a wide IQR marks a noisy run and the minimum approximates the uncontended cost.\n\n"
        f"- command: `{command}`\n"
        f"- machine: {cpu_model()}, {torch.get_num_threads()} torch threads "
        f"(of {os.cpu_count()} cores), torch {torch.__version__}, "
        f"Python {platform.python_version()}\n"
        f"- date: {today}\n\n"
        f"{result}\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params-millions", type=float, default=25.0, help="model size (default 25)")
    parser.add_argument("--repeats", type=int, default=40, help="timed interleaved rounds (default 40)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file whose section is updated")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few rounds: a seconds-long check")
    args = parser.parse_args(argv)
    if args.smoke:
        args.params_millions, args.repeats, args.warmup = 0.2, 5, 1
    if args.repeats < 2:
        parser.error("--repeats must be >= 2 (quartiles need two samples)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    shapes = gpt2_like_shapes(args.params_millions)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=gen) * 0.01 for s in shapes]
    cases = build_cases(shapes, grads)
    n_params = sum(g.numel() for g in grads)
    print(f"{n_params / 1e6:.2f}M params in {len(shapes)} tensors, {torch.get_num_threads()} threads, "
          f"{args.warmup} warm-up + {args.repeats} interleaved rounds", flush=True)
    for r in range(args.warmup + args.repeats):
        for i in range(len(cases)):
            cases[(r + i) % len(cases)].run(record=r >= args.warmup)

    result = table(cases)
    print(result)
    if not args.no_write:
        command = shlex.join(["python", "scripts/bench_step.py", *(sys.argv[1:] if argv is None else argv)])
        write_section(args.out, SECTION, section(command, n_params, len(shapes), args.repeats, result))
        print(f"wrote section to {args.out}")


if __name__ == "__main__":
    main()
