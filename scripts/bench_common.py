"""The benchmark harness: what every script in scripts/ shares, so that each script is a thin command line.

- run options: :func:`add_run_args` (threads, device, output dir, results file, docs file, no-write,
  smoke) and :func:`smoke_paths` (a smoke run writes only under a temporary directory);
- one training run: :func:`train` (``hf-badm train`` in this process: the CLI's parsing, then
  ``hf_badm.app.run.run``) and :func:`steps_to_reach` on its eval curve;
- corpora: ``builtin`` (the generated stories), ``stdlib_docs`` (real English prose gathered at run
  time from the docstrings of Python's standard library and pydoc's topics), ``debian_changelogs`` (the
  change entries of the Debian changelogs under /usr/share/doc) and ``licenses`` (the legal text of
  /usr/share/common-licenses and the packages' copyright files); nothing copied into the repository:
  :func:`corpus`, :func:`benchmark_tokenizer`;
- measuring optimizers: :func:`state_bytes` (the tensors an optimizer keeps) and :class:`StepTimer`
  (wall time of every ``optimizer.step()`` through torch's global step hooks, CUDA-synchronised);
- results: :class:`Results` (one JSON file, written after every run), :func:`machine` and :func:`stamp`
  (the machine and versions a table was measured on), :func:`write_section` (one section of
  docs/benchmarks.md replaced, the others kept).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib
import inspect
import io
import json
import logging
import os
import platform
import re
import shlex
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

# Settings every benchmark run shares unless a script overrides them.
BASE_RECIPE: dict[str, Any] = {
    "task": "pretrain", "model_family": "gpt2", "dataset": "builtin", "num_train_examples": 3000,
    "num_eval_examples": 200, "block_size": 64, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 64,
    "lr_scheduler_type": "cosine", "warmup_steps": 20, "max_grad_norm": 1.0, "weight_decay": 0.0,
    "eval_strategy": "steps", "logging_steps": 10, "report_to": "none", "include_num_input_tokens_seen": True,
    "save_strategy": "no", "disable_tqdm": True, "seed": 0, "overwrite_output_dir": True,  # a re-run replaces its point
}


# ----------------------------------------------------------------------------- run options

def add_run_args(p: argparse.ArgumentParser, name: str, results: Path | None = None, threads: int | None = 1) -> None:
    """The options every benchmark script shares: threads, device, where runs and results go, smoke mode."""
    p.add_argument("--threads", type=int, default=threads,
                   help="torch threads (default %(default)s; none given: torch's own choice)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                   help="where training runs (default cpu; auto: CUDA when available)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "outputs" / f"bench-{name}", help="runs, tokenizers, corpora")
    p.add_argument("--results", type=Path, default=results or RESULTS / f"{name}.json", help="result JSON")
    p.add_argument("--docs", type=Path, default=DOCS, help="markdown file whose section is updated")
    p.add_argument("--no-write", action="store_true", help="do not update the markdown file")
    p.add_argument("--smoke", action="store_true", help="seconds-long check (writes only under a temporary directory)")


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

    if a.threads:
        torch.set_num_threads(a.threads)
    if getattr(a, "device", "cpu") == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")


def device_recipe(device: str) -> dict[str, Any]:
    """Recipe fields for ``--device``: ``use_cpu`` unless the run may use CUDA."""
    return {"use_cpu": device == "cpu"}


def quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
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


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def rotations(items: Sequence[Any], rounds: int) -> Iterator[tuple[int, Any]]:
    """``(round, item)`` round-robin, the order rotated each round so that no item always runs first
    (load drift on a shared machine then hits every item alike)."""
    n = len(items)
    for r in range(rounds):
        for i in range(n):
            yield r, items[(r + i) % n]


# ----------------------------------------------------------------------------- corpora and tokenizers

_STDLIB_SKIP = {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "ensurepip", "lib2to3",
                "pydoc_data", "xxsubtype", "msilib", "winreg", "winsound", "msvcrt", "nt"}


def _paragraphs(doc: str) -> Iterator[str]:
    """Prose paragraphs of a docstring: one line each; code, doctests and tables left out."""
    for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = [line.strip() for line in para.splitlines()]
        if any(line.startswith((">>>", "...", "$ ", "%", "+--", "===", "***", "---")) for line in lines):
            continue
        text = " ".join(line for line in lines if line)
        if len(text.split()) >= 8 and sum(c.isalpha() or c.isspace() for c in text) >= 0.85 * len(text):
            yield text


def stdlib_docs_paragraphs() -> list[str]:
    """English prose no one here wrote, from what every Python installation has: the docstrings of the
    public standard-library modules (``sys.stdlib_module_names``, sorted) and of the classes, functions
    and methods they define, then pydoc's topic texts (the language reference). Deterministic for a
    given Python version; exact duplicates dropped."""
    if not hasattr(sys, "stdlib_module_names"):
        raise RuntimeError("the stdlib_docs corpus needs Python >= 3.10 (sys.stdlib_module_names)")
    seen: set[str] = set()
    out: list[str] = []

    def add(doc: Any) -> None:
        if isinstance(doc, str):
            for p in _paragraphs(doc):
                if p not in seen:
                    seen.add(p)
                    out.append(p)

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
                if inspect.isclass(obj):
                    for member, f in sorted(vars(obj).items()):
                        if (not member.startswith("_") or member == "__init__") and (
                                inspect.isroutine(f) or isinstance(f, (property, classmethod, staticmethod))):
                            add(getattr(f, "__doc__", None))
        try:
            from pydoc_data.topics import topics

            for key in sorted(topics):
                add(topics[key])
        except ImportError:
            pass
    return out


def _prose(text: str) -> bool:
    """A paragraph worth keeping: at least 8 words, mostly letters and spaces (no code, tables or addresses)."""
    return len(text.split()) >= 8 and sum(c.isalpha() or c.isspace() for c in text) >= 0.85 * len(text)


DOC_DIR = Path("/usr/share/doc")
LICENSE_DIR = Path("/usr/share/common-licenses")
CHANGELOG_CHARS = 3_000_000  # the changelogs hold ~8 M characters of entries; the first 3 M (by package) are plenty


def _need(paths: list[Path], what: str, corpus_name: str) -> list[Path]:
    if not paths:
        raise RuntimeError(f"the {corpus_name} corpus needs {what}, which this machine does not have")
    return paths


def debian_changelogs_paragraphs(doc_dir: Path = DOC_DIR, max_chars: int = CHANGELOG_CHARS) -> list[str]:
    """Change entries ("* ..." / "- ..." items, continuation lines joined) of every package's Debian changelog
    (``<doc_dir>/*/changelog*.gz``, packages sorted), English written by maintainers; exact duplicates dropped,
    stopped at ``max_chars``. Deterministic for a given set of installed packages."""
    import gzip

    files = _need(sorted(doc_dir.glob("*/changelog*.gz")), f"{doc_dir}/*/changelog*.gz", "debian_changelogs")
    seen: set[str] = set()
    out: list[str] = []
    total = 0
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
                if _prose(text) and text not in seen:
                    seen.add(text)
                    out.append(text)
                    total += len(text)
                    if total >= max_chars:
                        return out
            else:
                entry.append(line.strip())
    return out


def licenses_paragraphs(license_dir: Path = LICENSE_DIR, doc_dir: Path = DOC_DIR) -> list[str]:
    """Legal English: the paragraphs of the license texts in ``license_dir`` and of every package's copyright file
    (``<doc_dir>/*/copyright``; DEP-5 field lines and copyright notices left out), files sorted, exact duplicates
    dropped (the same license recurs in many files)."""
    files = _need(sorted(p for p in license_dir.glob("*") if p.is_file()), f"the license texts in {license_dir}",
                  "licenses") + sorted(doc_dir.glob("*/copyright"))
    seen: set[str] = set()
    out: list[str] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for block in re.split(r"\n\s*\.?\s*\n", text):  # DEP-5 writes blank lines inside a field as " ."
            lines = [ln.strip() for ln in block.splitlines() if not re.match(r"^[A-Z][A-Za-z-]*:(\s|$)", ln)]
            para = " ".join(ln for ln in lines if ln and ln != ".")
            if _prose(para) and para not in seen:
                seen.add(para)
                out.append(para)
    return out


# Corpora gathered at run time from what this machine ships: name -> (paragraphs, directory-name suffix).
GATHERED = {"stdlib_docs": (lambda: stdlib_docs_paragraphs(), f"-py{sys.version_info[0]}.{sys.version_info[1]}"),
            "debian_changelogs": (lambda: debian_changelogs_paragraphs(), ""),
            "licenses": (lambda: licenses_paragraphs(), "")}


def gathered(name: str, out_dir: Path, eval_every: int = 20) -> Path:
    """A gathered corpus as a dataset directory (``train.txt`` and ``test.txt``, one paragraph per line; every
    ``eval_every``-th paragraph held out) under ``out_dir``, gathered once (stdlib_docs: once per Python version)."""
    paragraphs, suffix = GATHERED[name]
    path = out_dir / "corpus" / f"{name}{suffix}"
    if not (path / "test.txt").exists():
        paras = paragraphs()
        path.mkdir(parents=True, exist_ok=True)
        (path / "train.txt").write_text("\n".join(p for i, p in enumerate(paras) if i % eval_every) + "\n")
        (path / "test.txt").write_text("\n".join(p for i, p in enumerate(paras) if not i % eval_every) + "\n")
        digest = hashlib.sha256("\n".join(paras).encode()).hexdigest()
        info_path(path).write_text(json.dumps({"paragraphs": len(paras), "characters": sum(map(len, paras)),
                                                      "sha256": digest, "python": platform.python_version()}))
    return path


def stdlib_docs(out_dir: Path, eval_every: int = 20) -> Path:
    """The ``stdlib_docs`` corpus as a dataset directory (:func:`gathered`)."""
    return gathered("stdlib_docs", out_dir, eval_every)


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
    gathered = re.sub(r"-py\d+\.\d+$", "", name)  # a corpus gathered here, per Python version
    return gathered if gathered != name else Path(spec).stem


def info_path(dataset_dir: Path) -> Path:
    """Size and hash of a gathered corpus, beside (not inside) its dataset directory."""
    return dataset_dir.parent / f"{dataset_dir.name}.json"


def corpus_info(spec: str) -> dict[str, Any]:
    meta = info_path(Path(spec))
    return json.loads(meta.read_text()) if spec != "builtin" and meta.exists() else {}


CHAR_SUFFIX = "-char"  # a corpus name with this suffix: the same text, byte-level tokens (no merges)


def benchmark_tokenizer(out_dir: Path, dataset: str = "builtin", chars: bool = False) -> str:
    """The benchmarks' BPE tokenizer (vocab 1024) of a corpus, trained on its training text, under ``out_dir``, once.
    ``chars``: no merges (the 256 bytes and the 4 special tokens), i.e. character-level on ASCII text."""
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
    """One ``hf-badm train`` run in this process (the CLI's own parsing, then ``hf_badm.app.run.run``).

    Returns a compact summary: eval curve with training-only wall time (evaluation excluded) at each
    eval point, final eval loss, training-only seconds per step, and the 1-minute load average."""
    from hf_badm.app.cli import parse
    from hf_badm.app.run import run

    model_args, task_args, badm, args = parse(dict(recipe), [], "bench")
    load_before = load()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) if quiet_output else contextlib.nullcontext():
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


# ----------------------------------------------------------------------------- measuring optimizers

def state_bytes(opt: Any) -> int:
    """Bytes of every tensor an optimizer keeps in ``state`` (BADM's per-slot duals are lists of tensors;
    0-d step counters excluded). Wrappers (accelerate's ``AcceleratedOptimizer``) are unwrapped."""
    import torch

    opt = getattr(opt, "optimizer", opt)
    total = 0
    for state in opt.state.values():
        for value in state.values():
            for t in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(t, torch.Tensor) and t.dim() > 0:
                    total += t.numel() * t.element_size()
    return total


class StepTimer:
    """Wall time of every ``optimizer.step()`` of any torch optimizer while active, through torch's global
    step hooks (``torch.optim.optimizer.register_optimizer_step_pre_hook`` / ``_post_hook``), the clock read
    after a CUDA synchronisation when CUDA is in use. Only the outermost optimizer's step is timed (an
    optimizer made of two inner ones counts once). Keeps the last optimizer seen (for :func:`state_bytes`)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.optimizer: Any = None
        self._depth, self._t0, self._handles = 0, 0.0, []

    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def _pre(self, opt: Any, args: Any, kwargs: Any) -> None:
        if self._depth == 0:
            self._sync()
            self._t0 = time.perf_counter()
            self.optimizer = opt
        self._depth += 1

    def _post(self, opt: Any, args: Any, kwargs: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._sync()
            self.seconds.append(time.perf_counter() - self._t0)

    def __enter__(self) -> "StepTimer":
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._handles = [register_optimizer_step_pre_hook(self._pre), register_optimizer_step_post_hook(self._post)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()


# ----------------------------------------------------------------------------- results and docs

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
        write_json(self.path, {"machine": self.meta, "runs": self.runs})


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
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    meta = {"cpu": cpu, "cores": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(0)
        meta["cuda"] = str(torch.version.cuda)
    return meta


def stamp(meta: dict[str, str], command: str, loads: list[float] | None = None) -> str:
    """The command, machine, versions and date lines under a table."""
    load_text = ""
    if loads:
        load_text = f" (1-minute load average during the runs {min(loads):.1f}–{max(loads):.1f})"
    gpu = f"; GPU {meta['gpu']} (CUDA {meta.get('cuda')})" if meta.get("gpu") else ""
    return (f"- command: `{command}`\n"
            f"- machine: {meta['cpu']}, {meta['torch_threads']} torch threads of {meta['cores']} cores, shared"
            f"{load_text}{gpu}; torch {meta['torch']}, transformers {meta['transformers']}, Python {meta['python']}\n"
            f"- date: {meta['date']}\n")


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
