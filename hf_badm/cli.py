"""hf-badm command line (train | compare | demo come with the CLI issue)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-badm", description="BADM (Batch ADMM) for the Hugging Face stack.")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
