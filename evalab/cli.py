"""The ``evalab`` command line."""
from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evalab",
        description="Measure how well efficient attention (RFA, Performer, EVA) approximates softmax attention.",
    )
    parser.add_argument("--version", action="version", version=f"evalab {__version__}")
    parser.add_subparsers(dest="command", title="commands")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
