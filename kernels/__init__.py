"""Drift statistics: NumPy/SciPy references, Numba CPU and CuPy GPU kernels.

No Ray here. See :class:`DriftDetector` (fit once, score many windows) and
:class:`WindowBuffer` (bounded tumbling/sliding windows).
"""

from flywheel.kernels.detector import BACKENDS, TESTS, DriftDetector, DriftResult, gpu_available
from flywheel.kernels.stats import benjamini_hochberg, bonferroni
from flywheel.kernels.windows import WindowBuffer

__all__ = [
    "BACKENDS",
    "TESTS",
    "DriftDetector",
    "DriftResult",
    "WindowBuffer",
    "benjamini_hochberg",
    "bonferroni",
    "gpu_available",
]
