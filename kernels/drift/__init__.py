"""Drift tests as objects: one module per test, found through a registry.

Each test (``ks.py``, ``cvm.py``, ``chi2.py``, ``psi.py``, ``mmd.py``) is a
:class:`DriftTest` subclass with its NumPy reference, Numba and CuPy kernels
side by side; ``base.py`` is the interface, ``_sorted.py`` what the rank tests
share, ``_rbf.py`` the RBF kernel blocks, ``registry.py`` the names.
:class:`flywheel.kernels.DriftDetector` runs any registered test.
"""

from flywheel.kernels.drift.base import CategoricalTest, ContinuousTest, DriftOptions, DriftTest, Scores
from flywheel.kernels.drift.registry import (
    BUILTIN,
    ENTRY_POINT_GROUP,
    available_tests,
    get_test,
    register_test,
    unregister_test,
)

__all__ = [
    "BUILTIN",
    "ENTRY_POINT_GROUP",
    "CategoricalTest",
    "ContinuousTest",
    "DriftOptions",
    "DriftTest",
    "Scores",
    "available_tests",
    "get_test",
    "register_test",
    "unregister_test",
]
