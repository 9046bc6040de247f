"""Fail early, with the install command, when an optional extra is missing.

A serving-only install (``pip install flywheel-ml``) leaves out the extras;
a command that needs one says which, before it starts any work.
"""

from __future__ import annotations

import importlib.util

from flywheel.protocol.errors import ConfigError

__all__ = ["require_extra"]


def require_extra(extra: str, modules: tuple[str, ...], what: str) -> None:
    """Raise ConfigError naming ``extra`` when any of ``modules`` cannot be
    imported. ``what`` says who needs it ("flywheel run", "backend 'torch'")."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"{what} needs the {extra} extra ({', '.join(missing)} not installed): "
                          f"pip install 'flywheel-ml[{extra}]'")
