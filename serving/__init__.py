"""Flywheel serving: the V2 (Open Inference Protocol) server on Ray Serve.

Importing this package is cheap: the names below load their modules (and Ray)
on first use, so ``import flywheel.serving`` in a notebook or a CLI that only
reads a config does not start or import Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Deployment": "flywheel.serving.app",
    "deploy": "flywheel.serving.app",
    "undeploy": "flywheel.serving.app",
    "DeployConfig": "flywheel.serving.config",
    "ModelConfig": "flywheel.serving.config",
    "ServerConfig": "flywheel.serving.config",
    "load_config": "flywheel.serving.config",
    "parse_config": "flywheel.serving.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flywheel.serving' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
