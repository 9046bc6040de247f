"""What the commands share: the registry options, ``--json``, tables and times."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import time
from collections.abc import Iterator, Sequence

from flywheel.common.settings import load_settings


def table(headers: Sequence[str], rows: list[Sequence[object]]) -> str:
    """Left-aligned columns under a dashed header line."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class Phases:
    """How long each step of a long command took, for its closing summary
    (where start-up time goes is what a user asks first)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, float]] = []

    def add(self, name: str, seconds: float) -> None:
        self.spans.append((name, seconds))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def summary(self) -> str:
        total = sum(s for _, s in self.spans)
        width = max((len(n) for n, _ in self.spans), default=0)
        lines = [f"  {n.ljust(width)}  {s:6.1f} s" for n, s in self.spans]
        return "\n".join(["where the time went:", *lines, f"  {'total'.ljust(width)}  {total:6.1f} s"])


def when(ts: float) -> str:
    """Epoch seconds as a UTC time."""
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def add_json_flag(group: argparse.ArgumentParser, leaves: Sequence[argparse.ArgumentParser],
                  help: str = "print JSON instead of a table") -> None:
    """``--json`` on a command group and on each of its sub-commands, so it
    works on either side of the sub-command (``flywheel models --json list``
    and ``flywheel models list --json``). The leaves' default is suppressed
    so that they never undo a ``--json`` given before them."""
    group.add_argument("--json", action="store_true", help=help)
    for leaf in leaves:
        leaf.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=help)


def add_registry_arguments(parser: argparse.ArgumentParser, *, artifacts: bool = True) -> None:
    """``--registry``, ``--artifacts`` (unless ``artifacts`` is false) and
    ``--actor``, defaulting to the process settings."""
    settings = load_settings()
    parser.add_argument("--registry", default=settings.registry_uri, help="registry URI (default: %(default)s)")
    if artifacts:
        parser.add_argument("--artifacts", default=settings.artifacts_uri,
                            help="artifact store (default: %(default)s)")
    parser.add_argument("--actor", default=settings.actor,
                        help="who acts, for the audit log (default: %(default)s)")


def os_identity() -> str:
    """``os:<account>`` of the user running this process, from the system's
    account database by the process's uid (not ``$USER`` / ``$LOGNAME``,
    which anyone can set): who approves or changes something from the CLI."""
    import os
    import pwd

    return f"os:{pwd.getpwuid(os.getuid()).pw_name}"
