"""The ``start-papyros`` command (also ``python -m papyros``)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from papyros.cli import demo, distributed

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, with where to read more."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="start-papyros",
        description=(
            "Run tasks in parallel with papyros. The backend and the number of workers "
            "come from papyros.toml, [tool.papyros] in pyproject.toml, or PAPYROS_* "
            "environment variables; options given here override them."
        ),
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo.add_parser(commands)
    distributed.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process arguments), run the command, return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
