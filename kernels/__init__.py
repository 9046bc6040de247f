"""Drift statistics (Numba CPU and CuPy GPU kernels with NumPy/SciPy references).

No Ray here. The kernels arrive with the drift issue; this subpackage exists so
that the import layout (``flywheel.kernels``) is fixed from the start.
"""

__all__: list[str] = []
