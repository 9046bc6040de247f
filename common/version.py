"""Which Flywheel this process runs: the installed distribution's version."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "flywheel-ml"


def flywheel_version() -> str:
    """The installed distribution's version ("unknown" when run from a tree
    that was never installed)."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"
