"""Peak memory of loading and tokenizing one huge single-line text file as `hf-badm train` does, and of a process
that only imports the same modules (docs/data.md): ``python scripts/measure_text_memory.py [--mb 20] [--no-write]``."""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "docs" / "results" / "text_memory.json"
IMPORTS = "from hf_badm.app.data import build_tokenizer, load_text_dataset, tokenize_for_causal_lm\n"
LOAD = IMPORTS + """import sys
ds = load_text_dataset(sys.argv[1])
blocks = tokenize_for_causal_lm(ds, build_tokenizer(), block_size=128)
print(len(blocks["train"]) * 128)
"""


def write_data(folder: Path, megabytes: int) -> None:
    from hf_badm.app.data import generate_corpus

    stories = " ".join(" ".join(generate_corpus(200, seed=0)).split())
    size = megabytes << 20
    (folder / "train.txt").write_text((stories + " ") * (size // (len(stories) + 1)) + stories[: size % (len(stories) + 1)])
    (folder / "test.txt").write_text("\n".join(generate_corpus(20, seed=1)) + "\n")


def peak_rss_mb(code: str, *args: str) -> tuple[float, float, str]:
    """(peak RSS in MB, seconds, stdout) of a fresh Python process running ``code``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise RuntimeError("this child's peak did not exceed an earlier child's: run the measurements largest-last")
    return peak / 1024, seconds, done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=20, help="size of the single line, in MB")
    parser.add_argument("--no-write", action="store_true", help=f"print the result, do not write {RESULT}")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_data(Path(tmp), opts.mb)
        imports_mb, _, _ = peak_rss_mb(IMPORTS)
        load_mb, seconds, tokens = peak_rss_mb(LOAD, tmp)
    result = {"line_mb": opts.mb, "tokens": int(tokens), "peak_rss_mb": round(load_mb), "imports_only_peak_rss_mb":
              round(imports_mb), "seconds": round(seconds, 1), "machine": f"{platform.machine()}, "
              f"{platform.python_implementation()} {platform.python_version()}",
              "command": f"python scripts/measure_text_memory.py --mb {opts.mb}"}
    print(json.dumps(result, indent=2))
    if not opts.no_write:
        RESULT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
