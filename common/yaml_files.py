"""Read a YAML file and validate it, naming the file in every error.

Deploy configs, job specs and scenario files are all read this way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from flywheel.protocol.errors import ConfigError

T = TypeVar("T")


def load_yaml(path: str | Path, parse: Callable[[Any], T], what: str = "config") -> T:
    """Read a YAML file and validate it with ``parse``; every ConfigError
    names the file (and the parser names the field)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None
    try:
        return parse(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}") from None
