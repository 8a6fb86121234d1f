"""Command-line entry point: ``l2-stores`` / ``python -m l2_stores``."""

from __future__ import annotations

import argparse
import sys

from . import demo
from .errors import StoreError


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = argparse.ArgumentParser(prog="l2-stores", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo", help="store a chain of L2 blocks, reopen and verify it"
    )
    demo_parser.add_argument("--dir", default="l2-demo-data", help="data directory")
    demo_parser.add_argument("--blocks", type=int, default=2000, help="blocks to add")
    args = parser.parse_args(argv)
    try:
        report = demo.run(args.dir, args.blocks)
    except (StoreError, AssertionError) as error:
        print(f"l2-stores: {error}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
