"""The `uvmbus` command line: one entry point, one module per command group.

Each module in ``COMMAND_MODULES`` defines ``register(subparsers)`` which adds
its subcommands and sets ``func`` on them.  Common options: ``--root`` (or the
``UVMBUS_ROOT`` environment variable; "/" on a real guest, the simulator's
root otherwise) and ``--json`` where the output is data.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from uvmbus.errors import UvmbusError

COMMAND_MODULES = [
    "uvmbus.services.cli.bus",
    "uvmbus.services.cli.bench",
    "uvmbus.services.cli.sim",
    "uvmbus.services.cli.net",
    "uvmbus.services.cli.blk",
    "uvmbus.services.cli.demo",
    "uvmbus.services.cli.daemons",      # after net/blk: adds `net bridge`, `blk export`, `units`
]


def default_root() -> str:
    return os.environ.get("UVMBUS_ROOT", "/")


def add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=default_root(),
                   help="filesystem root holding sys/ and dev/ (default: $UVMBUS_ROOT or /)")


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uvmbus", description="Userspace VMBus drivers for Hyper-V/Azure guests")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue          # command group not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except UvmbusError as exc:
        if args.verbose:
            raise
        print(f"uvmbus: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)
