"""Median ``optimizer.step()`` time and optimizer-state bytes: BADM (fused, per-sub-batch, preconditioned) vs AdamW, SGD and Muon.

Every optimizer updates its own copy of the same GPT-2-style float32 parameters (token and position
embeddings, per layer qkv/proj/fc/proj matrices with biases and layernorms; ``--shapes gpt2_small`` is
GPT-2 small's 124M exactly) with the same fixed random gradients. Muon is torch's ``torch.optim.Muon``
on the hidden matrices with AdamW on the embeddings, norms and biases (``hf_badm.peers``), the split BADM
newton_schulz uses. Repetitions are interleaved round-robin (the order rotates each round) so that
clock and thermal drift hit all optimizers equally; on CUDA every timing is synchronised. The table
reports medians, IQRs and ratios vs AdamW; state bytes also against Muon + AdamW.
"""

from __future__ import annotations

import argparse
import inspect
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
from hf_badm import BADM  # noqa: E402
from hf_badm.optim.local_solve import LOCAL_SOLVES  # noqa: E402
from hf_badm.peers import MUON_ADAMW_LR, MuonWithAdamW  # noqa: E402

SECTION = "## Optimizer step: time and state memory"
SUB_BATCHES = 4
HEADER = "| optimizer | median ms | IQR ms | min ms | time / AdamW | state MiB | state / AdamW | state / Muon+AdamW |"


def gpt2_like_shapes(params_millions: float) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style stack near the target size: the mix of a few huge matrices and
    many small vectors is what foreach kernels and per-tensor overheads see in practice."""
    target = params_millions * 1e6
    width = 64 * max(1, round(math.sqrt(target / 106) / 64))  # 106 d^2 ~ 6 layers + 32d vocab + 2d positions
    vocab, positions = 32 * width, 2 * width
    per_layer = 12 * width * width + 13 * width
    layers = max(1, round((target - (vocab + positions + 2) * width) / per_layer))
    return gpt2_shapes(vocab, positions, width, layers)


def gpt2_shapes(vocab: int, positions: int, d: int, layers: int) -> list[tuple[int, ...]]:
    """GPT-2's parameters in its module order (Conv1D weights stored in x out; LM head tied to the embedding)."""
    layer = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (positions, d)] + layer * layers + [(d,), (d,)]


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small (124M): vocab 50257, 1024 positions, 12 layers x 768."""
    return gpt2_shapes(50257, 1024, 768, 12)


def make_params(shapes: list[tuple[int, ...]], seed: int, device: str = "cpu") -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in shapes]


def split(params: list[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The grouping of ``hf_badm.badm_param_groups`` for newton_schulz (and of ``hf_badm.peers`` for Muon):
    hidden matrices; the two embedding tables (the first two tensors here) and all 1-D tensors."""
    hidden = [p for i, p in enumerate(params) if p.dim() == 2 and i >= 2]
    rest = [p for i, p in enumerate(params) if p.dim() != 2 or i < 2]
    return hidden, rest


def newton_schulz_badm(params: list[nn.Parameter], **kw: Any) -> BADM:
    hidden, rest = split(params)
    sigma = LOCAL_SOLVES["normalized"].elementwise_sigma
    return BADM([{"params": hidden}, {"params": rest, "preconditioner": "normalized", "sigma": sigma,
                                      "rho": LOCAL_SOLVES["normalized"].rho_over_sigma * sigma}],
                lr=0.03, preconditioner="newton_schulz", **kw)


def muon(params: list[nn.Parameter]) -> MuonWithAdamW:
    hidden, rest = split(params)
    return MuonWithAdamW([{"params": hidden}], [{"params": rest}], lr=0.03, adamw_lr=MUON_ADAMW_LR)


# key -> (row label, factory)
OPTIMIZERS: dict[str, tuple[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]]] = {
    "badm": ("BADM fused", lambda ps: BADM(ps, sigma=1000.0, rho=1500.0)),
    "badm_s4": ("BADM per_sub_batch", lambda ps: BADM(ps, sigma=1000.0, rho=1500.0, mode="per_sub_batch")),
    "badm_sm": ("BADM second_moment", lambda ps: BADM(ps, lr=10.0, preconditioner="second_moment")),
    "badm_norm": ("BADM normalized", lambda ps: BADM(ps, lr=3e-3, preconditioner="normalized")),
    "badm_ns": ("BADM newton_schulz (+ normalized elsewhere)", newton_schulz_badm),
    "muon": ("Muon (torch, + AdamW elsewhere)", muon),
    "adamw": ("AdamW(foreach)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
    "adamw_fused": ("AdamW(fused)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
    "sgd": ("SGD(momentum=0.9, foreach)", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True)),
}
CPU_DEFAULT = "badm,badm_s4,badm_norm,badm_ns,muon,adamw,sgd"
if "ns_dtype" in inspect.signature(BADM.__init__).parameters:  # Newton-Schulz in a chosen dtype (default: auto)
    for _dtype in ("bfloat16", "float32"):
        OPTIMIZERS[f"badm_ns_{_dtype}"] = (f"BADM newton_schulz, ns_dtype {_dtype} (+ normalized elsewhere)",
                                           lambda ps, d=_dtype: newton_schulz_badm(ps, ns_dtype=d))
    CPU_DEFAULT += ",badm_ns_bfloat16"


class Case:
    """One optimizer on its own parameter copy; ``run`` does one step and records its timings."""

    def __init__(self, key: str, params: list[nn.Parameter], grads: list[torch.Tensor], opt: torch.optim.Optimizer,
                 sync: bool) -> None:
        self.key, self.name, self.params, self.grads, self.opt, self.sync = key, OPTIMIZERS[key][0], params, grads, opt, sync
        self.step_s: list[float] = []
        self.absorb_s: list[float] = []
        self.round_s: list[float] = []

    def timed(self, fn: Callable[[], object]) -> float:
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def set_grads(self) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad = g  # fixed, shared gradients: no optimizer here writes into p.grad

    def run(self, record: bool) -> None:
        absorbs = []
        if isinstance(self.opt, BADM) and self.opt.mode == "per_sub_batch":
            for _ in range(SUB_BATCHES):
                self.set_grads()  # absorb_sub_batch clears p.grad
                absorbs.append(self.timed(self.opt.absorb_sub_batch))
        else:
            self.set_grads()
        elapsed = self.timed(self.opt.step)
        if record:
            self.step_s.append(elapsed)
            self.absorb_s.extend(absorbs)
            self.round_s.append(sum(absorbs) + elapsed)


def measure(shapes: list[tuple[int, ...]], keys: list[str], device: str = "cpu", repeats: int = 40,
            warmup: int = 3) -> list[Case]:
    """Every optimizer in ``keys`` on its own copy of the parameters, ``warmup`` + ``repeats`` interleaved rounds."""
    gen = torch.Generator().manual_seed(1)
    grads = [(torch.randn(s, generator=gen) * 0.01).to(device) for s in shapes]
    cases = []
    for key in keys:
        params = make_params(shapes, seed=0, device=device)
        cases.append(Case(key, params, grads, OPTIMIZERS[key][1](params), sync=device.startswith("cuda")))
    for r, case in bc.rotations(cases, warmup + repeats):
        case.run(record=r >= warmup)
    return cases


def summary(samples: list[float]) -> dict[str, float]:
    """Median, IQR and minimum (ms): contention on a shared machine only ever adds time, so the minimum
    helps read a noisy run."""
    q1, med, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return {"median_ms": med * 1e3, "iqr_ms": (q3 - q1) * 1e3, "min_ms": min(samples) * 1e3}


def rows(cases: list[Case]) -> list[dict[str, Any]]:
    """One dict per optimizer (per-sub-batch also its absorbs and total), with ratios to AdamW and Muon."""
    adamw = next((c for c in cases if c.key in ("adamw", "adamw_fused")), cases[0])
    muon_case = next((c for c in cases if c.key == "muon"), None)
    ref_s, ref_bytes = statistics.median(adamw.step_s), bc.state_bytes(adamw.opt)
    muon_bytes = bc.state_bytes(muon_case.opt) if muon_case else None
    out = []
    for c in cases:
        nbytes = bc.state_bytes(c.opt)
        out.append({"optimizer": c.key, "label": f"{c.name} step()" if c.absorb_s else c.name, **summary(c.step_s),
                    "time_vs_adamw": statistics.median(c.step_s) / ref_s, "state_bytes": nbytes,
                    "state_vs_adamw": nbytes / ref_bytes if ref_bytes else None,
                    "state_vs_muon": nbytes / muon_bytes if muon_bytes else None, "reference": adamw.name})
        if c.absorb_s:
            for label, samples in ((f"absorb_sub_batch() (each of {SUB_BATCHES})", c.absorb_s),
                                   (f"total: {SUB_BATCHES} absorbs + step()", c.round_s)):
                out.append({"optimizer": c.key, "label": f"{c.name} {label}", **summary(samples),
                            "time_vs_adamw": statistics.median(samples) / ref_s, "state_bytes": None})
    return out


def table(rs: list[dict[str, Any]]) -> str:
    lines = [HEADER, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rs:
        state = ("| (same state) | | " if r["state_bytes"] is None else
                 f"| {r['state_bytes'] / 2**20:.1f} | {bc.fmt(r['state_vs_adamw'], '.2f')}x "
                 f"| {bc.fmt(r['state_vs_muon'], '.2f')}{'x' if r['state_vs_muon'] else ''} ")
        lines.append(f"| {r['label']} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | {r['min_ms']:.2f} "
                     f"| {r['time_vs_adamw']:.2f}x {state}|")
    return "\n".join(lines)


def versus_muon(rs: list[dict[str, Any]]) -> str:
    """One sentence: the newton_schulz rows' median step time against Muon's (the same update at rho = sigma)."""
    by = {r["optimizer"]: r for r in rs if r["state_bytes"] is not None}
    if "muon" not in by:
        return ""
    parts = [f"{by[k]['label']} {by[k]['median_ms'] / by['muon']['median_ms']:.2f}x"
             for k in ("badm_ns", "badm_ns_bfloat16", "badm_ns_float32") if k in by]
    return ("Step time against torch's Muon (+AdamW), medians: " + "; ".join(parts) + ".\n") if parts else ""


def section(command: str, meta: dict[str, str], n_params: int, n_tensors: int, repeats: int, device: str,
            result: str, title: str = SECTION) -> str:
    return (
        f"{title}\n\n"
        f"Median wall time of one `optimizer.step()` and the bytes of optimizer state, all optimizers on "
        f"copies of the same {n_params / 1e6:.1f}M float32 parameters ({n_tensors} tensors, GPT-2-style "
        f"layer shapes) on {device} with the same fixed random gradients; {repeats} interleaved round-robin "
        f"repetitions after warm-up{' (CUDA-synchronised)' if device.startswith('cuda') else ''}. BADM's step "
        f"includes its NaN/Inf check of the gradients. Muon is torch's `torch.optim.Muon` (bfloat16 Newton-Schulz) "
        f"on the hidden matrices with AdamW on the embeddings, norms and biases (`hf_badm.peers`); BADM "
        f"newton_schulz orthogonalises the same matrices (`ns_dtype` auto: float32 on CPU, bfloat16 on CUDA; rows naming "
        f"an ns_dtype set it) with `normalized` on the rest. `per_sub_batch` "
        f"is timed as {SUB_BATCHES} `absorb_sub_batch()` calls (each row: one call) followed by `step()`; its "
        f"state is {SUB_BATCHES} duals plus one aggregate per parameter. Ratios are of medians; other load only "
        f"adds time, so a wide IQR marks a noisy run and the minimum approximates the uncontended cost.\n\n"
        f"{bc.stamp(meta, command)}\n{result}\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params-millions", type=float, default=25.0, help="model size of --shapes gpt2_like (default 25)")
    p.add_argument("--shapes", choices=["gpt2_like", "gpt2_small"], default="gpt2_like",
                   help="gpt2_like: a GPT-2-style stack of --params-millions; gpt2_small: GPT-2 small's 124M")
    p.add_argument("--optimizers", default=None, help=f"comma-separated subset of {','.join(OPTIMIZERS)} "
                   f"(default: {CPU_DEFAULT}; on CUDA also adamw_fused)")
    p.add_argument("--repeats", type=int, default=40, help="timed interleaved rounds (default 40)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    bc.add_run_args(p, "step", threads=None)
    a = p.parse_args(argv)
    if a.smoke:
        bc.smoke_paths(a, "step")
        a.shapes, a.params_millions, a.repeats, a.warmup = "gpt2_like", 0.2, 5, 1
    if a.repeats < 2:
        p.error("--repeats must be >= 2 (quartiles need two samples)")
    bc.setup(a)
    device = "cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu"
    keys = (a.optimizers or CPU_DEFAULT + (",adamw_fused" if device == "cuda" else "")).split(",")
    shapes = gpt2_small_shapes() if a.shapes == "gpt2_small" else gpt2_like_shapes(a.params_millions)
    n_params = sum(math.prod(s) for s in shapes)
    print(f"{n_params / 1e6:.2f}M params in {len(shapes)} tensors on {device}, {torch.get_num_threads()} threads, "
          f"{a.warmup} warm-up + {a.repeats} interleaved rounds", flush=True)
    rs = rows(measure(shapes, keys, device, a.repeats, a.warmup))
    result = table(rs) + "\n\n" + versus_muon(rs)
    print(result)
    command = bc.command_line() if argv is None else "python scripts/bench_step.py " + " ".join(argv)
    meta = bc.machine()
    bc.write_json(a.results, {"machine": meta, "command": command, "device": device, "params": n_params,
                              "tensors": len(shapes), "repeats": a.repeats, "rows": rs})
    if not a.no_write:
        bc.write_section(a.docs, SECTION, section(command, meta, n_params, len(shapes), a.repeats, device, result))
        print(f"wrote section to {a.docs}")


if __name__ == "__main__":
    main()
