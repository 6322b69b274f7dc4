"""The README's "Use with transformers, PEFT and TRL" snippets run as written (in a fresh process)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippets() -> list[str]:
    text = README.read_text()
    section = text.split("## Use with transformers, PEFT and TRL", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_trainer_snippets_run(tmp_path):
    snippets = readme_snippets()
    assert len(snippets) >= 5
    script = tmp_path / "snippets.py"
    script.write_text("\n".join(snippets))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "WANDB_DISABLED": "true"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
