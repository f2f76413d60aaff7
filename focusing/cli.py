"""`focusing <command>`: every module in `focusing/commands/` that defines `register(subparsers)` is a command.

A command module adds its parser with `subparsers.add_parser(...)`, sets `func=run` as its default, and
imports heavy dependencies inside `run`, so `focusing --help` stays fast. `run(args)` returns an exit code
(or None for 0). A `FocusingError` becomes one line on stderr and exit code 1; a bad argument (argparse, and
the checks of `focusing.commands.checks`, which run at parse time, before any work) one line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import focusing.commands
from focusing import __version__
from focusing.errors import FocusingError


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: `focusing CMD: error: MESSAGE (see focusing CMD --help)`, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="focusing",
        description="Focusing: meshes to sparse-voxel latents and back (view-consistent sparse voxels).",
    )
    parser.add_argument("--version", action="version", version=f"focusing {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(focusing.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"focusing.commands.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a bad argument (2, its one line already printed)
        return exc.code if isinstance(exc.code, int) else 0
    try:
        code = args.func(args)
    except FocusingError as exc:
        print(f"focusing {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"focusing {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
