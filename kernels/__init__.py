"""Drift statistics: NumPy/SciPy references, Numba CPU and CuPy GPU kernels.

No Ray here. See :class:`DriftDetector` (fit once, score many windows),
:class:`WindowBuffer` (bounded tumbling/sliding windows) and the drift-test
registry (:func:`available_tests`, :func:`get_test`, :func:`register_test`;
one module per test under ``flywheel.kernels.drift``).
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module; loaded on first use, so that reading a config (which asks
# the registry which tests exist) does not import SciPy and Numba
_EXPORTS = {
    "BACKENDS": "flywheel.kernels.detector",
    "TESTS": "flywheel.kernels.detector",
    "DriftDetector": "flywheel.kernels.detector",
    "DriftResult": "flywheel.kernels.detector",
    "gpu_available": "flywheel.kernels.detector",
    "DriftTest": "flywheel.kernels.drift",
    "available_tests": "flywheel.kernels.drift",
    "get_test": "flywheel.kernels.drift",
    "register_test": "flywheel.kernels.drift",
    "unregister_test": "flywheel.kernels.drift",
    "benjamini_hochberg": "flywheel.kernels.stats",
    "bonferroni": "flywheel.kernels.stats",
    "WindowBuffer": "flywheel.kernels.windows",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flywheel.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
