"""Nothing outside hf_badm/optim/solves/ asks for a local solve by name: behaviour hangs off the solves' own
attributes (orthogonalises, plain, elementwise_sigma, settings, ...), so a new solve lands in one file."""

from __future__ import annotations

import ast
from pathlib import Path

from hf_badm.optim.local_solve import LOCAL_SOLVES

PACKAGE = Path(__file__).resolve().parent.parent / "hf_badm"
SOLVES = PACKAGE / "optim" / "solves"


def _names(node: ast.AST) -> set[str]:
    """The string constants an operand of a comparison holds (itself, or the elements of a tuple/list/set)."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {n.value for n in items if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def solve_name_comparisons(source: str) -> list[tuple[int, str]]:
    """``(line, code)`` of each comparison with a solve's name. "none" is also an ordinary word ("report_to: none"),
    so it counts only where the comparison's code speaks of a preconditioner or a solve."""
    names = set(LOCAL_SOLVES)
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        hits = set().union(*(_names(n) for n in [node.left, *node.comparators])) & names
        code = ast.get_source_segment(source, node) or ""
        if hits - {"none"} or (hits and ("precondition" in code or "solve" in code)):
            found.append((node.lineno, code))
    return found


def test_the_check_finds_what_it_looks_for():
    assert solve_name_comparisons('if cfg.preconditioner == "newton_schulz": pass')
    assert solve_name_comparisons('x = name in ("second_moment", "normalized")')
    assert solve_name_comparisons('ok = badm.preconditioner != "none"')
    assert not solve_name_comparisons('ok = str(resume).lower() in ("false", "no", "none")')


def test_no_module_outside_the_solves_compares_a_solve_name():
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{line}: {code}"
                 for path in sorted(PACKAGE.rglob("*.py")) if SOLVES not in path.parents
                 for line, code in solve_name_comparisons(path.read_text())]
    assert not offenders, "compare a solve's attribute, not its name:\n" + "\n".join(offenders)
