"""Every measured number the README and docs/ quote traces to a result file under docs/results/: the generated parts
(the summary of docs/benchmarks.md, the README's tables, the communication section) equal what their command writes
from the result files now, and every decimal number elsewhere in the prose appears in a result file (at the
precision quoted) or in a table the benchmark scripts generated from one. Fast: reads files, trains nothing."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NUMBER = re.compile(r"(?<![\w.\-/])\d+\.\d+(?![\w.]*\d)")
sys.path.insert(0, str(ROOT / "scripts"))


def _leaves(value, out: list[float]) -> None:
    """The numbers of a result file, but not of its eval curves (thousands of values that would match anything)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k not in ("curve", "log_history"):
                _leaves(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _leaves(v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out.append(float(value))
    elif isinstance(value, str):
        out.extend(float(x) for x in NUMBER.findall(value))


def _known() -> set[str]:
    """Each number of every result file at 1 to 4 decimals (and ratios quoted in percent), and the numbers of the
    tables the benchmark scripts generated from those files (docs/benchmarks.md, whose sections they write)."""
    values: list[float] = []
    for path in RESULTS.rglob("*.json"):
        _leaves(json.loads(path.read_text()), values)
    known = {f"{v * scale:.{d}f}" for v in values for d in range(1, 5) for scale in (1, 100)}
    for path in [ROOT / "docs" / "benchmarks.md", *RESULTS.rglob("*.md")]:
        for line in path.read_text().splitlines():
            if line.startswith("|"):
                known.update(NUMBER.findall(line))
    return known


def _prose(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the prose: fenced code, inline code, links' targets and generated blocks left out."""
    out, fenced, generated = [], False, False
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
            continue
        if "<!-- bench_report:" in line:
            generated = True
        if "<!-- /bench_report -->" in line:
            generated = False
        if fenced or generated or line.startswith("|") or line.startswith("- command:") or line.startswith("- machine:"):
            continue
        out.append((i, re.sub(r"`[^`]*`|\]\([^)]*\)|arXiv:\S+|arxiv\.org/\S+|(?:transformers|torch|TRL|PEFT|Python) \d[\d.]*", " ",
                                    line)))
    return out


def test_every_quoted_number_is_in_a_result_file():
    known = _known()
    missing = [f"{path.relative_to(ROOT)}:{i}: {n}" for path in DOCS for i, text in _prose(path)
               for n in NUMBER.findall(text) if n not in known]
    assert not missing, "numbers with no result file behind them:\n" + "\n".join(missing)


def test_generated_tables_match_their_result_files():
    import bench_comm
    import bench_report

    doc, readme = (ROOT / "docs" / "benchmarks.md").read_text(), (ROOT / "README.md").read_text()
    assert doc.startswith("# Benchmarks\n\n" + bench_report.SECTION), "the summary must open docs/benchmarks.md"
    assert bench_report.summary().rstrip() in doc, "run: python scripts/bench_report.py"
    assert bench_report.replace_blocks(readme, bench_report.readme_blocks()) == readme, \
        "run: python scripts/bench_report.py"
    assert bench_comm.section(json.loads((RESULTS / "comm.json").read_text())).rstrip() in doc, \
        "run: python scripts/bench_comm.py --report"


@pytest.mark.parametrize("text, found", [("ends at 0.705 (1.58x)", ["0.705", "1.58"]), ("v1.2.3, 1e-2, x0.5", [])])
def test_number_pattern(text, found):
    assert NUMBER.findall(text) == found
