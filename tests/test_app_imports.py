"""The import graph of hf_badm: every module imports, no cycle, the optimizer free of Hugging Face, the
library outside the application, and no SystemExit outside the console script's entry point."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import hf_badm

ROOT = Path(hf_badm.__file__).parent
MODULES = {m.name: Path(m.module_finder.path) / (m.name.rsplit(".", 1)[-1] + ("/__init__.py" if m.ispkg else ".py"))
           for m in pkgutil.walk_packages([str(ROOT)], prefix="hf_badm.")}
MODULES["hf_badm"] = ROOT / "__init__.py"
HUGGING_FACE = {"transformers", "accelerate", "peft", "trl", "datasets", "deepspeed"}


def imported_names(path: Path, module: str) -> set[str]:
    """Every module named by an import statement of the file (top level or inside functions); ``from p import m``
    names the submodule p.m when there is one, else p."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    return names


GRAPH = {m: {n for n in imported_names(p, m) if n in MODULES and n != m} for m, p in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def test_every_module_imports():
    assert {"hf_badm.app.cli", "hf_badm.app.run", "hf_badm.app.data", "hf_badm.app.plots", "hf_badm.data",
            "hf_badm.optim.badm"} <= set(MODULES)
    for name in sorted(MODULES):
        if name != "hf_badm.__main__":  # runs the console script when imported
            importlib.import_module(name)


def test_the_module_graph_has_no_cycle():
    assert GRAPH["hf_badm.app.run"] and GRAPH["hf_badm.app.cli"]  # the parse sees the app's imports
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("hf_badm.optim")))
def test_the_optimizer_imports_nothing_from_hugging_face(module):
    top = {n.split(".")[0] for n in imported_names(MODULES[module], module)}
    assert not top & HUGGING_FACE, f"{module} imports {sorted(top & HUGGING_FACE)}"


def test_the_library_does_not_import_the_application():
    """Only the entry points (``python -m hf_badm``, the ``hf_badm.data`` re-export) reach into hf_badm.app."""
    library = [m for m in MODULES if not m.startswith("hf_badm.app") and m not in ("hf_badm.__main__", "hf_badm.data")]
    assert {m: sorted(n for n in GRAPH[m] if n.startswith("hf_badm.app")) for m in library} == {m: [] for m in library}


def test_only_the_entry_point_exits():
    """The library and the app raise exceptions; ``hf_badm/__main__.py`` alone calls sys.exit(main())."""
    exits = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.func if isinstance(node, ast.Call) else node.exc if isinstance(node, ast.Raise) else None
            if isinstance(name, ast.Call):
                name = name.func
            text = ast.unparse(name) if name is not None else ""
            if text in ("SystemExit", "sys.exit", "exit", "quit", "os._exit"):
                exits.append(module)
    assert exits == ["hf_badm.__main__"]


def test_data_stays_importable_under_its_library_name():
    from hf_badm import data
    from hf_badm.app import data as app_data

    assert data.__all__ == app_data.__all__ and all(getattr(data, n) is getattr(app_data, n) for n in data.__all__)


ENGINES = ("deepspeed", "torch.distributed")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_engine_code_lives_in_parallel(module):
    """The optimizer's math imports no engine (no DeepSpeed, no torch.distributed, DTensor included); the sharding of
    every engine lives in hf_badm.parallel (the Trainer glue may meet at a barrier, the app may launch)."""
    engines = {n for n in imported_names(MODULES[module], module) if n.startswith(ENGINES)}
    if module.startswith("hf_badm.optim"):
        assert not engines, f"{module} imports {sorted(engines)}"
    elif not module.startswith(("hf_badm.parallel", "hf_badm.app")):
        assert not {n for n in engines if n.startswith(("deepspeed", "torch.distributed.tensor"))}, module


REPO = ROOT.parent


def test_one_spelling_of_orthogonalise():
    """Names, docs and recipes spell the word one way (the British -is-, as most of the code did)."""
    files = [p for p in REPO.rglob("*") if p.suffix in (".py", ".md", ".yaml", ".yml", ".sh", ".toml")
             and not {".venv", ".venv-floor", ".git", "outputs", "build"} & set(p.relative_to(REPO).parts[:1])]
    assert len(files) > 50
    other = "orthogonali" + "z"  # spelled apart, so that this file passes its own check
    assert not [str(p.relative_to(REPO)) for p in files if other in p.read_text(errors="ignore").lower()]


def test_newton_schulz_lives_in_one_file_under_optim():
    """The iterations, coefficients, scales and matrix views are defined in optim/solves/newton_schulz.py only (the
    engines' side, in hf_badm/parallel, calls them); no other optim module defines a Newton-Schulz name."""
    home = "hf_badm.optim.solves.newton_schulz"
    names = ("NS_COEFFICIENTS", "POLAR_EXPRESS_COEFFICIENTS", "orthogonalise", "lr_scale", "MatrixView", "NSSchedule")
    for module, path in MODULES.items():
        defined = {t.id for node in ast.parse(path.read_text()).body if isinstance(node, ast.Assign)
                   for t in node.targets if isinstance(t, ast.Name)} | {
            node.name for node in ast.parse(path.read_text()).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        assert module == home or not defined & set(names), (module, defined & set(names))
    assert set(names) <= set(vars(importlib.import_module(home)))


def _method_assignments(tree: ast.AST, methods: set[str]) -> list[str]:
    """``obj.m = ...`` and ``setattr(obj, "m", ...)`` (monkeypatch's too) of a Trainer method ``m`` on anything but a
    class (``cls``, or a capitalised name): what swapping a method on a live trainer looks like."""
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and t.attr in methods and not _is_class(t.value):
                found.append(f"line {t.lineno}: {ast.unparse(t)}")
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "setattr"
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in methods
                and not _is_class(node.args[0])):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def _is_class(node: ast.AST) -> bool:
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name == "cls" or name[:1].isupper()


def test_no_trainer_method_is_swapped_on_a_live_object():
    """The Trainer glue overrides (calling super()); it never assigns a method on a trainer instance."""
    from transformers import Trainer

    methods = {n for n in dir(Trainer) if callable(getattr(Trainer, n)) and not n.startswith("__")}
    swaps = {str(p.relative_to(REPO)): found for p in [*ROOT.rglob("*.py"), *(REPO / "tests").rglob("*.py")]
             if (found := _method_assignments(ast.parse(p.read_text()), methods))}
    assert not swaps, swaps
    assert _method_assignments(ast.parse("trainer.compute_loss = f\nsetattr(t, 'log', g)"), methods) == [
        "line 1: trainer.compute_loss", "line 2: setattr(t, 'log', g)"]


def test_the_start_up_check_lists_every_private_trainer_name_used():
    """Every private Trainer method hf_badm overrides is checked at start-up (hf_badm.trainer.PRIVATE_HOOKS, or the
    version-gated RESHARD_HOOK), and every private attribute it reads is listed with what stands in where absent."""
    from transformers import Trainer

    import hf_badm.trainer as glue
    from hf_badm.trainer import PRIVATE_ATTRIBUTES, PRIVATE_HOOKS

    gated = {hook[0] for hook in [getattr(glue, "RESHARD_HOOK", None)] if hook}  # checked where it is called

    private = {n for n in dir(Trainer) if n.startswith("_") and not n.startswith("__")}
    overridden, read = set(), set()
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                overridden |= {f.name for f in node.body if isinstance(f, ast.FunctionDef)} & private
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) >= 2
                    and isinstance(node.args[1], ast.Constant) and str(node.args[1].value).startswith("_")):
                read.add(node.args[1].value)
    assert overridden and overridden <= set(PRIVATE_HOOKS) | gated, overridden - set(PRIVATE_HOOKS)
    listed = {name.split(".")[-1] for name in PRIVATE_ATTRIBUTES}
    assert "_loss_shifts_labels" in read and read - {"__wrapped__"} <= listed | {"_observes_loss"}, read - listed
