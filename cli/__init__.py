"""``flywheel ...``: every command of the command line (one module each).

The only room that may import all the others; nothing imports it.
"""

from flywheel.cli.main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
