"""Shared pieces of the benchmark scripts: one in-process training run through ``hf_badm.run``,
machine/version stamps, incremental JSON results and section-wise updates of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import re
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOCS = ROOT / "docs" / "benchmarks.md"

# Settings every benchmark run shares unless a script overrides them.
BASE_RECIPE: dict[str, Any] = {
    "task": "pretrain", "model_family": "gpt2", "dataset": "builtin", "num_train_examples": 3000,
    "num_eval_examples": 200, "block_size": 64, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 64,
    "lr_scheduler_type": "cosine", "warmup_steps": 20, "max_grad_norm": 1.0, "weight_decay": 0.0,
    "eval_strategy": "steps", "logging_steps": 10, "report_to": "none", "include_num_input_tokens_seen": True,
    "save_strategy": "no", "disable_tqdm": True, "seed": 0,
}


def benchmark_tokenizer(out_dir: Path) -> str:
    """The benchmarks' BPE tokenizer (vocab 1024, built from the built-in corpus) under ``out_dir``, built once."""
    tok_dir = out_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        from hf_badm.app.data import build_tokenizer

        build_tokenizer(vocab_size=1024, save_dir=tok_dir)
    return str(tok_dir)


def quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def load() -> float:
    return os.getloadavg()[0]


def train(recipe: dict[str, Any], quiet_output: bool = True) -> dict[str, Any]:
    """One ``hf-badm train`` run in this process (the CLI's own parsing, then ``hf_badm.run.run``).

    Returns a compact summary: eval curve with training-only wall time (evaluation excluded) at each
    eval point, final eval loss, training-only seconds per step, and the 1-minute load average."""
    from hf_badm.app.cli import parse
    from hf_badm.app.run import run

    model_args, task_args, badm, args = parse(dict(recipe), [], "bench")
    load_before = load()
    start = time.perf_counter()
    if quiet_output:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            metrics = run(model_args, task_args, badm, args)
    else:
        metrics = run(model_args, task_args, badm, args)
    elapsed = time.perf_counter() - start
    curve, eval_time, last_wall = [], 0.0, 0.0
    for h in metrics["log_history"]:
        if "eval_loss" in h and "step" in h:
            eval_time += h.get("eval_runtime", 0.0)
            wall = h.get("wall_time", last_wall)
            curve.append({"step": h["step"], "eval_loss": h["eval_loss"], "train_s": max(wall - eval_time, 0.0)})
        if "wall_time" in h:
            last_wall = h["wall_time"]
    steps = metrics["recipe"]["max_steps"]
    train_s = metrics["train_runtime"] - eval_time
    train_losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
    final = metrics.get("eval_loss")
    if curve and curve[-1]["step"] != steps and final is not None:
        curve.append({"step": steps, "eval_loss": final, "train_s": train_s})
    return {"final_eval_loss": final, "final_train_loss": train_losses[-1] if train_losses else None,
            "curve": curve, "train_s": train_s, "s_per_step": train_s / steps, "total_s": elapsed,
            "tokens_per_second": metrics.get("tokens_per_second"), "peak_memory_mb": metrics.get("peak_memory_mb"),
            "exact_match": metrics.get("exact_match"), "load_1min": (load_before + load()) / 2}


def steps_to_reach(curve: list[dict[str, float]], target: float, key: str = "step") -> float | None:
    """First point where the eval curve reaches ``target``, linearly interpolated between eval points."""
    prev = None
    for point in curve:
        if point["eval_loss"] <= target:
            if prev is None or prev["eval_loss"] == point["eval_loss"]:
                return float(point[key])
            frac = (prev["eval_loss"] - target) / (prev["eval_loss"] - point["eval_loss"])
            return prev[key] + frac * (point[key] - prev[key])
        prev = point
    return None


class Results:
    """All runs of a benchmark in one JSON file, written after every run so partial sweeps survive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs: list[dict[str, Any]] = json.loads(path.read_text())["runs"] if path.exists() else []
        self.meta = machine()

    @classmethod
    def merged(cls, paths: list[Path]) -> "Results":
        """Read-only union of several result files (the report reads every corpus and size)."""
        out = cls(Path("/nonexistent/merged.json"))
        for path in paths:
            data = json.loads(path.read_text())
            out.runs += data["runs"]
            out.meta = data.get("machine", out.meta)
        return out

    def get(self, key: str) -> dict[str, Any] | None:
        return next((r for r in self.runs if r["key"] == key), None)

    def add(self, run: dict[str, Any]) -> None:
        self.runs = [r for r in self.runs if r["key"] != run["key"]] + [run]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"machine": self.meta, "runs": self.runs}, indent=1, default=str))
        tmp.replace(self.path)


def machine() -> dict[str, str]:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}


def stamp(meta: dict[str, str], command: str, loads: list[float]) -> str:
    lo, hi = (min(loads), max(loads)) if loads else (0.0, 0.0)
    return (f"- command: `{command}`\n"
            f"- machine: {meta['cpu']}, {meta['torch_threads']} torch threads of {meta['cores']} cores, shared "
            f"(1-minute load average during the runs {lo:.1f}–{hi:.1f}); torch {meta['torch']}, transformers "
            f"{meta['transformers']}, Python {meta['python']}\n- date: {meta['date']}\n")


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def add_run_args(p: argparse.ArgumentParser, name: str) -> None:
    """The options every benchmark script shares: threads, where runs and results go, smoke mode."""
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=ROOT / "outputs" / f"bench-{name}")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / f"{name}.json")
    p.add_argument("--docs", type=Path, default=DOCS)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--smoke", action="store_true", help="seconds-long check")


def write_section(path: Path, title: str, text: str) -> None:
    """Replace only the section ``title`` (up to the next ``## `` heading); other sections survive."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# Benchmarks\n\n{text}")
        return
    doc = path.read_text()
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: text.rstrip("\n") + "\n\n", doc, count=1).rstrip("\n") + "\n"
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc)


def fmt(value: Any, spec: str = ".3f", none: str = "–") -> str:
    return none if value is None else format(value, spec)
