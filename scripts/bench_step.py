"""Median ``optimizer.step()`` time and optimizer-state bytes (docs/benchmarks.md, "Optimizer step"): every optimizer
on its own copy of the same GPT-2-shaped parameters and fixed gradients, rounds interleaved so drift hits all alike."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
from hf_badm import BADM  # noqa: E402

SECTION = "## Optimizer step: time and state memory"
SUB_BATCHES = 4
OPTIMIZERS: dict[str, tuple[str, Any]] = {  # key -> (row label, factory)
    "badm": ("BADM fused", lambda ps: BADM(ps, sigma=1000.0, rho=1500.0)),
    "badm_s4": ("BADM per_sub_batch", lambda ps: BADM(ps, sigma=1000.0, rho=1500.0, mode="per_sub_batch")),
    "badm_sm": ("BADM second_moment", lambda ps: BADM(ps, lr=10.0, preconditioner="second_moment")),
    "badm_norm": ("BADM normalized", lambda ps: BADM(ps, lr=3e-3, preconditioner="normalized")),
    "badm_ns": ("BADM newton_schulz (+ normalized elsewhere)", bc.newton_schulz_badm),
    "muon": ("Muon (torch, + AdamW elsewhere)", bc.muon_adamw),
    "adamw": ("AdamW(foreach)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
    "adamw_fused": ("AdamW(fused)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
    "sgd": ("SGD(momentum=0.9, foreach)", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True)),
}
OPTIMIZERS.update({f"badm_ns_{d}": (f"BADM newton_schulz, ns_dtype {d} (+ normalized elsewhere)",
                                     lambda ps, d=d: bc.newton_schulz_badm(ps, ns_dtype=d)) for d in ("bfloat16", "float32")})
CPU_DEFAULT = "badm,badm_s4,badm_norm,badm_ns,muon,adamw,sgd,badm_ns_bfloat16"


def measure(shapes: list[tuple[int, ...]], keys: list[str], device: str = "cpu", repeats: int = 40,
            warmup: int = 3) -> list[dict[str, Any]]:
    """``warmup`` + ``repeats`` interleaved rounds of every optimizer in ``keys``; per_sub_batch: SUB_BATCHES
    ``absorb_sub_batch()`` calls, then ``step()``."""
    gen = torch.Generator().manual_seed(1)
    grads = [(torch.randn(s, generator=gen) * 0.01).to(device) for s in shapes]
    cases = []
    for key in keys:
        params = bc.make_params(shapes, seed=0, device=device)
        cases.append({"key": key, "params": params, "opt": OPTIMIZERS[key][1](params), "step": [], "absorb": []})

    def set_grads(c: dict[str, Any]) -> None:
        for p, g in zip(c["params"], grads):
            p.grad = g  # fixed, shared gradients: no optimizer here writes into p.grad

    for r, c in bc.rotations(cases, warmup + repeats):
        absorbs = []
        for _ in range(SUB_BATCHES if getattr(c["opt"], "mode", None) == "per_sub_batch" else 0):
            set_grads(c)  # absorb_sub_batch clears p.grad
            absorbs.append(bc.timed(c["opt"].absorb_sub_batch))
        set_grads(c)
        elapsed = bc.timed(c["opt"].step)
        if r >= warmup:
            c["step"].append(elapsed)
            c["absorb"] += absorbs
            c.setdefault("round", []).append(sum(absorbs) + elapsed)
    return cases


def rows(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per optimizer (per-sub-batch also its absorbs and total), with ratios to AdamW and Muon + AdamW."""
    adamw = next((c for c in cases if c["key"] in ("adamw", "adamw_fused")), cases[0])
    ref_s, ref_bytes = statistics.median(adamw["step"]), bc.state_bytes(adamw["opt"])
    muon_bytes = next((bc.state_bytes(c["opt"]) for c in cases if c["key"] == "muon"), None)
    out = []
    for c in cases:
        name, nbytes = OPTIMIZERS[c["key"]][0], bc.state_bytes(c["opt"])
        out.append({"optimizer": c["key"], "label": f"{name} step()" if c["absorb"] else name, **bc.summary(c["step"]),
                    "time_vs_adamw": statistics.median(c["step"]) / ref_s, "state_bytes": nbytes,
                    "state_vs_adamw": nbytes / ref_bytes if ref_bytes else None,
                    "state_vs_muon": nbytes / muon_bytes if muon_bytes else None, "reference": OPTIMIZERS[adamw["key"]][0]})
        for label, samples in ((f"absorb_sub_batch() (each of {SUB_BATCHES})", c["absorb"]),
                               (f"total: {SUB_BATCHES} absorbs + step()", c["round"])) if c["absorb"] else ():
            out.append({"optimizer": c["key"], "label": f"{name} {label}", **bc.summary(samples),
                        "time_vs_adamw": statistics.median(samples) / ref_s, "state_bytes": None})
    return out


def table(rs: list[dict[str, Any]]) -> str:
    return "\n".join(bc.md_table(
        ["optimizer", "median ms", "IQR ms", "min ms", "time / AdamW", "state MiB", "state / AdamW", "state / Muon+AdamW"],
        "lrrrrrrr", [[r["label"], f"{r['median_ms']:.2f}", f"{r['iqr_ms']:.2f}", f"{r['min_ms']:.2f}",
                      f"{r['time_vs_adamw']:.2f}x", *(["(same state)", "", ""] if r["state_bytes"] is None else [
                          f"{r['state_bytes'] / 2**20:.1f}", bc.ratio(r["state_vs_adamw"]),
                          bc.ratio(r["state_vs_muon"])])] for r in rs]))


def versus_muon(rs: list[dict[str, Any]]) -> str:
    """The newton_schulz rows' median step time against Muon's (the same update at rho = sigma)."""
    by = {r["optimizer"]: r for r in rs if r["state_bytes"] is not None}
    parts = [f"{by[k]['label']} {by[k]['median_ms'] / by['muon']['median_ms']:.2f}x"
             for k in ("badm_ns", "badm_ns_bfloat16", "badm_ns_float32") if k in by and "muon" in by]
    return ("Step time against torch's Muon (+AdamW), medians: " + "; ".join(parts) + ".\n") if parts else ""


def main(argv: list[str] | None = None) -> None:
    p = bc.parser(__doc__, "step", threads=None)
    p.add_argument("--params-millions", type=float, default=25.0, help="model size of --shapes gpt2_like")
    p.add_argument("--shapes", choices=["gpt2_like", "gpt2_small"], default="gpt2_like",
                   help="gpt2_like: a GPT-2-style stack of --params-millions; gpt2_small: GPT-2 small's 124M")
    p.add_argument("--optimizers", default=None, help=f"comma-separated subset of {','.join(OPTIMIZERS)} "
                   f"(default: {CPU_DEFAULT}; on CUDA also adamw_fused)")
    p.add_argument("--repeats", type=int, default=40, help="timed interleaved rounds")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    a = p.parse_args(argv)
    if a.smoke:
        bc.smoke_paths(a, "step")
        a.shapes, a.params_millions, a.repeats, a.warmup = "gpt2_like", 0.2, 5, 1
    if a.repeats < 2:
        p.error("--repeats must be >= 2 (quartiles need two samples)")
    bc.setup(a)
    device = "cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu"
    keys = (a.optimizers or CPU_DEFAULT + (",adamw_fused" if device == "cuda" else "")).split(",")
    shapes = bc.gpt2_small_shapes() if a.shapes == "gpt2_small" else bc.gpt2_like_shapes(a.params_millions)
    n_params = sum(math.prod(s) for s in shapes)
    print(f"{n_params / 1e6:.2f}M params in {len(shapes)} tensors on {device}, {torch.get_num_threads()} threads, "
          f"{a.warmup} warm-up + {a.repeats} interleaved rounds", flush=True)
    rs = rows(measure(shapes, keys, device, a.repeats, a.warmup))
    command = bc.command_line() if argv is None else "python scripts/bench_step.py " + " ".join(argv)
    meta = bc.machine()
    bc.write_json(a.results, {"machine": meta, "command": command, "device": device, "params": n_params,
                              "tensors": len(shapes), "repeats": a.repeats, "rows": rs})
    bc.publish(a, SECTION, f"{SECTION}\n\n{bc.stamp(meta, command)}\n{table(rs)}\n\n{versus_muon(rs)}")


if __name__ == "__main__":
    main()
