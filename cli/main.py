"""The ``flywheel`` command: one sub-command per module of this package.

A new command is one module here with ``HELP`` (one line) and
``add_parser(subparsers)``, plus its line in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from flywheel.common.version import flywheel_version
from flywheel.protocol.errors import FlywheelError

# (command, module under flywheel.cli), in the order --help lists them
COMMANDS: tuple[tuple[str, str], ...] = (
    ("run", "run"),
    ("serve", "serve"),
    ("models", "models"),
    ("keys", "keys"),
    ("loops", "loops"),
    ("export", "export"),
    ("train", "train"),
    ("predict", "predict"),
    ("bench", "bench"),
    ("lb", "lb"),
)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, every command registered."""
    modules = [(name, importlib.import_module(f"flywheel.cli.{module}")) for name, module in COMMANDS]
    width = max(len(name) for name, _ in modules)
    listing = "\n".join(f"  {name:<{width}}  {mod.HELP}" for name, mod in modules)
    parser = argparse.ArgumentParser(
        prog="flywheel",
        description="Flywheel: model serving (V2 over HTTP and gRPC), training and the model "
                    "registry on Ray.\n\ncommands:\n" + listing,
        epilog="`flywheel COMMAND --help` describes a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"flywheel-ml {flywheel_version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for _, mod in modules:
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (2 on a Flywheel error,
    whose message is printed as ``error: ...``)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except FlywheelError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0
