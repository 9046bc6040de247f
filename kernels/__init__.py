"""Drift statistics: NumPy/SciPy references, Numba CPU and CuPy GPU kernels.

No Ray here. See :class:`DriftDetector` (fit once, score many windows),
:class:`WindowBuffer` (bounded tumbling/sliding windows) and the drift-test
registry (:func:`available_tests`, :func:`get_test`, :func:`register_test`;
one module per test under ``flywheel.kernels.drift``).
"""

from flywheel.kernels.detector import BACKENDS, TESTS, DriftDetector, DriftResult, gpu_available
from flywheel.kernels.drift import DriftTest, available_tests, get_test, register_test, unregister_test
from flywheel.kernels.stats import benjamini_hochberg, bonferroni
from flywheel.kernels.windows import WindowBuffer

__all__ = [
    "BACKENDS",
    "TESTS",
    "DriftDetector",
    "DriftResult",
    "DriftTest",
    "WindowBuffer",
    "available_tests",
    "benjamini_hochberg",
    "bonferroni",
    "get_test",
    "gpu_available",
    "register_test",
    "unregister_test",
]
