"""The benchmark harness every script in scripts/ stands on, so that each script is a thin command line: run options,
corpora gathered at run time, one `hf-badm train` run, the GPT-2-shaped parameters and optimizers timed step by step,
subprocess workers, result files, machine stamps and the docs sections they write (protocols: docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import hashlib
import importlib
import inspect
import io
import json
import logging
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOCS = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "docs" / "results"
CORPORA = ("builtin", "stdlib_docs", "debian_changelogs", "licenses")
BASE_RECIPE: dict[str, Any] = {  # what every benchmark run shares unless a script overrides it
    "task": "pretrain", "model_family": "gpt2", "dataset": "builtin", "num_train_examples": 3000,
    "num_eval_examples": 200, "block_size": 64, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 64,
    "lr_scheduler_type": "cosine", "warmup_steps": 20, "max_grad_norm": 1.0, "weight_decay": 0.0,
    "eval_strategy": "steps", "logging_steps": 10, "report_to": "none", "include_num_input_tokens_seen": True,
    "save_strategy": "no", "disable_tqdm": True, "seed": 0, "overwrite_output_dir": True,  # a re-run replaces its point
}


# ----------------------------------------------------------------------------- run options

def parser(doc: str | None, name: str | None = None, results: Path | None = None,
           threads: int | None = 1) -> argparse.ArgumentParser:
    """A script's parser (description: its docstring's first line); ``name``: with the shared run options."""
    p = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    if name:
        add_run_args(p, name, results, threads)
    return p


def add_run_args(p: argparse.ArgumentParser, name: str, results: Path | None = None, threads: int | None = 1) -> None:
    p.add_argument("--threads", type=int, default=threads, help="torch threads (default %(default)s: torch's choice)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="auto: CUDA when available")
    p.add_argument("--out-dir", type=Path, default=ROOT / "outputs" / f"bench-{name}", help="runs, tokenizers, corpora")
    add_output_args(p, results or RESULTS / f"{name}.json")
    p.add_argument("--smoke", action="store_true", help="seconds-long check (writes only under a temporary directory)")


def add_output_args(p: argparse.ArgumentParser, results: Path) -> None:
    """Where a benchmark's results and docs section go (:func:`publish`)."""
    p.add_argument("--results", type=Path, default=results, help="result JSON")
    p.add_argument("--docs", type=Path, default=DOCS, help="markdown file whose section is updated")
    p.add_argument("--no-write", action="store_true", help="do not update the markdown file")


def smoke_paths(a: argparse.Namespace, name: str) -> Path:
    """Point ``out_dir``, ``results`` and ``docs`` of a smoke run into a fresh temporary directory."""
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{name}-smoke-"))
    a.out_dir, a.docs = tmp, tmp / "benchmarks.md"
    a.results = tmp / ("results" if a.results.suffix != ".json" else a.results.name)
    return tmp


def setup(a: argparse.Namespace) -> None:
    """Quiet logs, torch threads, and the device check (``--device cuda`` without CUDA stops here)."""
    quiet()
    import torch

    if getattr(a, "threads", None):
        torch.set_num_threads(a.threads)
    if getattr(a, "device", "cpu") == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")


def recipe(key: str, out_dir: Path, device: str, steps: int, fields: dict[str, Any]) -> dict[str, Any]:
    """A run's recipe: :data:`BASE_RECIPE`, ``steps`` with an evaluation every tenth of them, the device, and an
    output directory named after the run's key; ``fields`` on top."""
    return {**BASE_RECIPE, "max_steps": steps, "eval_steps": max(1, steps // 10), "use_cpu": device == "cpu",
            "output_dir": str(out_dir / "runs" / run_key(key)), **fields}


def quiet() -> None:
    for k, v in (("TOKENIZERS_PARALLELISM", "false"), ("TRANSFORMERS_VERBOSITY", "error"),
                 ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1")):
        os.environ.setdefault(k, v)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


def load() -> float:
    return os.getloadavg()[0]


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def rotations(items: Sequence[Any], rounds: int) -> Iterator[tuple[int, Any]]:
    """``(round, item)`` round-robin, rotated each round so that load drift hits every item alike."""
    for r in range(rounds):
        for i in range(len(items)):
            yield r, items[(r + i) % len(items)]


def run_key(key: str) -> str:
    """A run's key as a directory name."""
    return key.replace("|", "_").replace("=", "")


# ----------------------------------------------------------------------------- corpora and tokenizers

_STDLIB_SKIP = {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "ensurepip", "lib2to3",
                "pydoc_data", "xxsubtype", "msilib", "winreg", "winsound", "msvcrt", "nt"}
DOC_DIR, LICENSE_DIR = Path("/usr/share/doc"), Path("/usr/share/common-licenses")
CHANGELOG_CHARS = 3_000_000  # the changelogs hold ~8 M characters of entries; the first 3 M (by package) are plenty


def _prose(text: str) -> bool:
    """A paragraph worth keeping: at least 8 words, mostly letters and spaces (no code, tables or addresses)."""
    return len(text.split()) >= 8 and sum(c.isalpha() or c.isspace() for c in text) >= 0.85 * len(text)


class _Distinct(dict):
    """Paragraphs (its keys) in order, exact duplicates dropped."""

    def add(self, text: str) -> bool:
        """Keep ``text`` if it is prose not seen before; whether it was kept."""
        fresh = _prose(text) and text not in self
        if fresh:
            self[text] = None
        return fresh


def stdlib_docs_paragraphs() -> list[str]:
    """English prose from every Python installation: the docstrings of the public standard-library modules and of
    what they define (sorted), then pydoc's topics; code, doctests and tables left out. Deterministic per version."""
    if not hasattr(sys, "stdlib_module_names"):
        raise RuntimeError("the stdlib_docs corpus needs Python >= 3.10 (sys.stdlib_module_names)")
    out = _Distinct()

    def add(doc: Any) -> None:
        for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)) if isinstance(doc, str) else []:
            lines = [line.strip() for line in para.splitlines()]
            if not any(line.startswith((">>>", "...", "$ ", "%", "+--", "===", "***", "---")) for line in lines):
                out.add(" ".join(line for line in lines if line))

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for name in sorted(sys.stdlib_module_names):
            if name.startswith("_") or name in _STDLIB_SKIP:
                continue
            try:
                module = importlib.import_module(name)
            except BaseException:  # noqa: BLE001 - platform-specific modules fail to import in many ways
                continue
            add(module.__doc__)
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                    continue
                if inspect.isclass(obj) or inspect.isroutine(obj):
                    add(obj.__doc__)
                for member, f in sorted(vars(obj).items()) if inspect.isclass(obj) else ():
                    if (not member.startswith("_") or member == "__init__") and (
                            inspect.isroutine(f) or isinstance(f, (property, classmethod, staticmethod))):
                        add(getattr(f, "__doc__", None))
        with contextlib.suppress(ImportError):
            from pydoc_data.topics import topics

            for key in sorted(topics):
                add(topics[key])
    return list(out)


def _need(paths: list[Path], what: str, corpus_name: str) -> list[Path]:
    if not paths:
        raise RuntimeError(f"the {corpus_name} corpus needs {what}, which this machine does not have")
    return paths


def debian_changelogs_paragraphs(doc_dir: Path = DOC_DIR, max_chars: int = CHANGELOG_CHARS) -> list[str]:
    """The change entries ("* ..." / "- ...", continuation lines joined) of every package's Debian changelog
    (packages sorted), stopped at ``max_chars``."""
    files = _need(sorted(doc_dir.glob("*/changelog*.gz")), f"{doc_dir}/*/changelog*.gz", "debian_changelogs")
    out, total = _Distinct(), 0
    for f in files:
        try:
            lines = gzip.open(f, "rt", encoding="utf-8", errors="replace").read().splitlines()
        except (OSError, EOFError):
            continue
        entry: list[str] = []
        for line in [*lines, ""]:
            item = re.match(r"^\s+[*+-]\s+(.*)", line)
            if item or not (line.startswith(" ") and line.strip() and entry and not line.strip().startswith("--")):
                text = " ".join(entry)
                entry = [item.group(1).strip()] if item else []
                if out.add(text):
                    total += len(text)
                    if total >= max_chars:
                        return list(out)
            else:
                entry.append(line.strip())
    return list(out)


def licenses_paragraphs(license_dir: Path = LICENSE_DIR, doc_dir: Path = DOC_DIR) -> list[str]:
    """Legal English: the paragraphs of the license texts and of every package's copyright file (DEP-5 field lines
    left out), files sorted."""
    files = _need(sorted(p for p in license_dir.glob("*") if p.is_file()), f"the license texts in {license_dir}",
                  "licenses") + sorted(doc_dir.glob("*/copyright"))
    out = _Distinct()
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for block in re.split(r"\n\s*\.?\s*\n", text):  # DEP-5 writes blank lines inside a field as " ."
            lines = [ln.strip() for ln in block.splitlines() if not re.match(r"^[A-Z][A-Za-z-]*:(\s|$)", ln)]
            out.add(" ".join(ln for ln in lines if ln and ln != "."))
    return list(out)


# Corpora gathered at run time from what this machine ships: name -> (paragraphs, directory-name suffix).
GATHERED = {"stdlib_docs": (lambda: stdlib_docs_paragraphs(), f"-py{sys.version_info[0]}.{sys.version_info[1]}"),
            "debian_changelogs": (lambda: debian_changelogs_paragraphs(), ""),
            "licenses": (lambda: licenses_paragraphs(), "")}


def gathered(name: str, out_dir: Path, eval_every: int = 20) -> Path:
    """A gathered corpus as a dataset directory (train.txt, test.txt: every ``eval_every``-th paragraph), once."""
    paragraphs, suffix = GATHERED[name]
    path = out_dir / "corpus" / f"{name}{suffix}"
    if not (path / "test.txt").exists():
        paras = paragraphs()
        path.mkdir(parents=True, exist_ok=True)
        (path / "train.txt").write_text("\n".join(p for i, p in enumerate(paras) if i % eval_every) + "\n")
        (path / "test.txt").write_text("\n".join(p for i, p in enumerate(paras) if not i % eval_every) + "\n")
        info_path(path).write_text(json.dumps({
            "paragraphs": len(paras), "characters": sum(map(len, paras)), "python": platform.python_version(),
            "sha256": hashlib.sha256("\n".join(paras).encode()).hexdigest()}))
    return path


def corpus(name: str, out_dir: Path) -> str:
    """The ``dataset`` recipe value of a corpus: ``builtin``, a gathered one (:data:`GATHERED`), or a file path."""
    if name in GATHERED:
        return str(gathered(name, out_dir))
    return name if name == "builtin" else str(Path(name).resolve())


def corpus_name(spec: str) -> str:
    """Short name of a corpus for keys and file names (``stdlib_docs-py3.11`` -> ``stdlib_docs``)."""
    if spec == "builtin":
        return spec
    name = Path(spec).name
    short = re.sub(r"-py\d+\.\d+$", "", name)  # a corpus gathered here, per Python version
    return short if short != name else Path(spec).stem


def info_path(dataset_dir: Path) -> Path:
    return dataset_dir.parent / f"{dataset_dir.name}.json"


def corpus_info(spec: str) -> dict[str, Any]:
    meta = info_path(Path(spec))
    return json.loads(meta.read_text()) if spec != "builtin" and meta.exists() else {}


CHAR_SUFFIX = "-char"  # a corpus name with this suffix: the same text, byte-level tokens (no merges)


def benchmark_tokenizer(out_dir: Path, dataset: str = "builtin", chars: bool = False) -> str:
    """The benchmarks' BPE tokenizer (vocab 1024) of a corpus, trained on its training text, once; ``chars``: no
    merges (the 256 bytes and 4 special tokens)."""
    from hf_badm.app.data import build_tokenizer

    name = corpus_name(dataset)
    tok_dir = out_dir / (("tokenizer" if name == "builtin" else f"tokenizer-{Path(dataset).name}")
                         + (CHAR_SUFFIX if chars else ""))
    if not (tok_dir / "tokenizer.json").exists():
        texts = None
        if name != "builtin":
            source = Path(dataset) / "train.txt" if Path(dataset).is_dir() else Path(dataset)
            texts = [line for line in source.read_text().splitlines() if line.strip()]
        build_tokenizer(texts, vocab_size=260 if chars else 1024, save_dir=tok_dir)
    return str(tok_dir)


# ----------------------------------------------------------------------------- one training run

def train(recipe: dict[str, Any], quiet_output: bool = True) -> dict[str, Any]:
    """One ``hf-badm train`` run in this process (the CLI's parsing, then ``hf_badm.app.run.run``): eval curve with
    training-only seconds at each point, final losses, seconds per step, the 1-minute load average."""
    from hf_badm.app.cli import parse
    from hf_badm.app.run import run

    model_args, task_args, badm, args = parse(dict(recipe), [], "bench")
    load_before, start = load(), time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) if quiet_output else contextlib.nullcontext():
        metrics = run(model_args, task_args, badm, args)
    elapsed = time.perf_counter() - start
    curve, eval_time, last_wall = [], 0.0, 0.0
    for h in metrics["log_history"]:
        if "eval_loss" in h and "step" in h:
            eval_time += h.get("eval_runtime", 0.0)
            curve.append({"step": h["step"], "eval_loss": h["eval_loss"],
                          "train_s": max(h.get("wall_time", last_wall) - eval_time, 0.0)})
        last_wall = h.get("wall_time", last_wall)
    steps, final = metrics["recipe"]["max_steps"], metrics.get("eval_loss")
    train_s = metrics["train_runtime"] - eval_time
    train_losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
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


def reach(runs: list[dict[str, Any]], target: float, key: str = "step") -> tuple[float | None, str]:
    """Where the runs' eval curves reach ``target`` (:func:`steps_to_reach`), the mean over those that do (None: none
    does), and " (k/n seeds)" when only some do."""
    hit = [x for r in runs if (x := steps_to_reach(r["curve"], target, key)) is not None]
    some = f" ({len(hit)}/{len(runs)} seeds)" if 0 < len(hit) < len(runs) else ""
    return (statistics.mean(hit) if hit else None), some


def geomean(values: Sequence[float | None]) -> float | None:
    """Geometric mean; None when a value is missing (or there is none)."""
    return math.exp(statistics.mean(map(math.log, values))) if values and all(values) else None


def worker(argv: list[str], fn: Any) -> bool:
    """The worker side of :func:`in_subprocess`: ``--worker SPEC.json`` runs ``fn(spec)`` and writes its result."""
    if argv[:1] != ["--worker"]:
        return False
    quiet()
    path = Path(argv[1])
    path.with_suffix(".out.json").write_text(json.dumps(fn(json.loads(path.read_text()))))
    return True


def in_subprocess(script: str, spec: Any, work: Path, name: str) -> dict[str, Any]:
    """``script --worker SPEC`` in a fresh process (its own peak memory and device state): its result or error."""
    path = work / "specs" / f"{run_key(name)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, script, "--worker", str(path)], capture_output=True, text=True)
    return ({"error": done.stderr[-3000:]} if done.returncode else json.loads(path.with_suffix(".out.json").read_text()))


# ----------------------------------------------------------------------------- parameters and optimizers measured

def gpt2_shapes(vocab: int, positions: int, d: int, layers: int) -> list[tuple[int, ...]]:
    """GPT-2's parameters in its module order (Conv1D weights stored in x out; LM head tied to the embedding)."""
    layer = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (positions, d)] + layer * layers + [(d,), (d,)]


def gpt2_like_shapes(params_millions: float) -> list[tuple[int, ...]]:
    """A GPT-2-style stack near the target size (a few huge matrices, many small vectors: what kernels see)."""
    target = params_millions * 1e6
    width = 64 * max(1, round(math.sqrt(target / 106) / 64))  # 106 d^2 ~ 6 layers + 32d vocab + 2d positions
    layers = max(1, round((target - (34 * width + 2) * width) / (12 * width * width + 13 * width)))
    return gpt2_shapes(32 * width, 2 * width, width, layers)


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    return gpt2_shapes(50257, 1024, 768, 12)  # GPT-2 small (124M)


def make_params(shapes: list[tuple[int, ...]], seed: int, device: str = "cpu", scale: float = 0.02) -> list:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * scale).to(device)) for s in shapes]


def split_hidden(params: list, embeddings: int = 2) -> tuple[list, list]:
    """hf_badm's grouping for newton_schulz and Muon: hidden matrices; the embeddings (the first tensors) and 1-D ones."""
    hidden = [p for i, p in enumerate(params) if p.dim() == 2 and i >= embeddings]
    return hidden, [p for i, p in enumerate(params) if p.dim() != 2 or i < embeddings]


def newton_schulz_badm(params: list, lr: float = 0.03, embeddings: int = 2, **kw: Any) -> Any:
    """BADM newton_schulz on the hidden matrices, ``normalized`` (its shipped sigma and rho) on the rest."""
    from hf_badm import BADM
    from hf_badm.optim.local_solve import LOCAL_SOLVES

    hidden, rest = split_hidden(params, embeddings)
    norm = LOCAL_SOLVES["normalized"]
    return BADM([{"params": hidden}, {"params": rest, "preconditioner": "normalized", "sigma": norm.elementwise_sigma,
                                      "rho": norm.rho_over_sigma * norm.elementwise_sigma}],
                lr=lr, preconditioner="newton_schulz", **kw)


def muon_adamw(params: list) -> Any:
    from hf_badm.peers import MUON_ADAMW_LR, MuonWithAdamW

    hidden, rest = split_hidden(params)
    return MuonWithAdamW([{"params": hidden}], [{"params": rest}], lr=0.03, adamw_lr=MUON_ADAMW_LR)


def state_bytes(opt: Any) -> int:
    """Bytes of every tensor an optimizer keeps in ``state`` (lists of tensors too; 0-d counters excluded)."""
    import torch

    opt = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer
    return sum(t.numel() * t.element_size() for state in opt.state.values() for value in state.values()
               for t in (value if isinstance(value, (list, tuple)) else [value])
               if isinstance(t, torch.Tensor) and t.dim() > 0)


def sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Any) -> float:
    """Seconds of one call, CUDA-synchronised around it."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def summary(samples: list[float]) -> dict[str, float]:
    """Median, IQR and minimum in ms (load only adds time: the minimum helps read a noisy run)."""
    q1, med, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return {"median_ms": med * 1e3, "iqr_ms": (q3 - q1) * 1e3, "min_ms": min(samples) * 1e3}


class StepTimer:
    """Wall time of every outermost ``optimizer.step()`` of any torch optimizer while active (torch's global step
    hooks, CUDA-synchronised); keeps the last optimizer seen."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.optimizer: Any = None
        self._depth, self._t0, self._handles = 0, 0.0, []

    def _pre(self, opt: Any, *_: Any) -> None:
        if self._depth == 0:
            sync()
            self._t0, self.optimizer = time.perf_counter(), opt
        self._depth += 1

    def _post(self, opt: Any, *_: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            sync()
            self.seconds.append(time.perf_counter() - self._t0)

    def __enter__(self) -> "StepTimer":
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._handles = [register_optimizer_step_pre_hook(self._pre), register_optimizer_step_post_hook(self._post)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()


# ----------------------------------------------------------------------------- results, stamps, docs, plots

class Results:
    """All runs of a benchmark in one JSON file, written after every run so that partial sweeps survive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs: list[dict[str, Any]] = json.loads(path.read_text())["runs"] if path.exists() else []
        self.meta = machine()

    @classmethod
    def merged(cls, paths: list[Path]) -> "Results":
        """Read-only union of several result files."""
        out = cls(Path("/nonexistent/merged.json"))
        for path in paths:
            data = json.loads(path.read_text())
            out.runs += data["runs"]
            out.meta = data.get("machine", out.meta)
        return out

    def get(self, key: str) -> dict[str, Any] | None:
        return next((r for r in self.runs if r["key"] == key), None)

    def add(self, run: dict[str, Any]) -> None:
        """Record ``run`` (replacing its key's earlier run) with the CPU it ran on: the file's ``machine`` is its
        last writer's, and one recipe's loss differs between machines."""
        run = {**run, "cpu": run.get("cpu", self.meta["cpu"])}
        self.runs = [r for r in self.runs if r["key"] != run["key"]] + [run]
        write_json(self.path, {"machine": self.meta, "runs": self.runs})

    def record(self, run: dict[str, Any]) -> None:
        """:meth:`add` a training run and print its final loss, seconds per step and load."""
        self.add(run)
        print(f"{run['key']}: eval {fmt(run['final_eval_loss'], '.4f')}  {run['s_per_step'] * 1e3:.0f} ms/step  "
              f"load {run['load_1min']:.1f}", flush=True)

    def loads(self) -> list[float]:
        return [r["load_1min"] for r in self.runs if "load_1min" in r]


def write_json(path: Path, data: Any) -> None:
    """Write atomically (a reader never sees half a file; an interrupted run leaves the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def machine() -> dict[str, str]:
    """CPU (and GPU, when torch sees one), thread count and library versions of this process."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = found.group(1).strip() if found else cpu
    meta = {"cpu": cpu, "cores": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}
    if torch.cuda.is_available():
        meta.update(gpu=torch.cuda.get_device_name(0), cuda=str(torch.version.cuda))
    return meta


def stamp(meta: dict[str, str], command: str, loads: list[float] | None = None) -> str:
    """The command, machine, versions and date lines under a table."""
    load_text = f" (1-minute load average during the runs {min(loads):.1f}–{max(loads):.1f})" if loads else ""
    gpu = f"; GPU {meta['gpu']} (CUDA {meta.get('cuda')})" if meta.get("gpu") else ""
    return (f"- command: `{command}`\n"
            f"- machine: {meta['cpu']}, {meta['torch_threads']} torch threads of {meta['cores']} cores, shared"
            f"{load_text}{gpu}; torch {meta['torch']}, transformers {meta['transformers']}, Python {meta['python']}\n"
            f"- date: {meta['date']}\n")


def head(title: str, meta: dict[str, str], command: str, runs: list[dict[str, Any]], link: str,
         note: str = "") -> list[str]:
    """A section's first lines: its title, the stamp (with the load during ``runs``), where every run is recorded."""
    return [f"{title}\n", stamp(meta, command, [r["load_1min"] for r in runs]), f"- every run: [`{link}`]({link}){note}\n"]


_GENERATED = ("- command:", "|", "#", "**", "![")  # where a section's own prose (kept by keep_intro) ends


def write_section(path: Path, title: str, text: str, keep_intro: bool = False) -> None:
    """Replace only the section ``title`` (up to the next ``## `` heading). ``keep_intro``: the section's prose (the
    lines before its first stamp, table or subsection) stays as the docs hold it, ``text`` replaces the rest."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# Benchmarks\n\n{text}")
        return
    doc = path.read_text()
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    old = pattern.search(doc)
    if old and keep_intro:
        intro = []
        for line in old.group(0).splitlines()[1:]:
            if line.startswith(_GENERATED):
                break
            intro.append(line)
        text = "\n".join([title, *intro]).rstrip("\n") + "\n\n" + text[len(title):].lstrip("\n")
    if old:
        doc = pattern.sub(lambda _: text.rstrip("\n") + "\n\n", doc, count=1).rstrip("\n") + "\n"
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc)


def publish(a: argparse.Namespace, title: str, text: str) -> None:
    """Print a section and, unless ``--no-write``, write it (its prose kept) into ``--docs``."""
    print(text)
    if not a.no_write:
        write_section(a.docs, title, text, keep_intro=True)


def fmt(value: Any, spec: str = ".3f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def ratio(value: float | None) -> str:
    """A ratio as "1.23x", a missing one as "–"."""
    return fmt(value, ".2f") + ("x" if value is not None else "")


def md_table(header: Sequence[str], align: str, rows: list[Sequence[Any]]) -> list[str]:
    """Markdown table lines; ``align``: one letter per column, ``l`` left, ``r`` right."""
    return (["| " + " | ".join(header) + " |", "|" + "".join("---|" if c == "l" else "---:|" for c in align)]
            + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def figure(ncols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=size)


def save_figure(fig: Any, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
