"""Drift detectors: fit once on the reference, then score many live windows.

    det = DriftDetector("ks", backend="auto").fit(reference)   # rows x features
    result = det.score(window)        # per-feature statistic, p-value, flag

Tests come from the registry (``flywheel.kernels.drift``): ``ks`` and ``cvm``
(continuous features, per feature), ``chi2`` and ``psi`` (categorical integer
codes, per feature), ``mmd`` (all features jointly, RBF kernel, permutation
test), and any test registered there. Backends: ``numpy`` (the NumPy/SciPy
reference), ``numba`` (CPU kernels), ``cupy`` (GPU kernels), or ``auto``
(cupy when a GPU and CuPy are present and the test has CuPy kernels, else
numba). What fitting keeps is the test's business (sorted reference columns,
reference counts, the reference kernel block); a window only pays for itself.
The detector adds what every test shares: settings checked when given, the
backend choice, the multiple-testing correction and the verdict's shape.

Thread-safety: ``score`` may run concurrently with itself; ``fit`` may not.
"""

from __future__ import annotations

import importlib
from typing import Any

import msgspec
import numpy as np

from flywheel.kernels import stats as st
from flywheel.kernels._checks import check_nans
from flywheel.kernels.drift import BUILTIN, DriftOptions, DriftTest, get_test
from flywheel.protocol.errors import ConfigError

TESTS = tuple(BUILTIN)  # the built-in tests; drift.available_tests() adds plug-ins
BACKENDS = ("auto", "numpy", "numba", "cupy")
CORRECTIONS = tuple(st.CORRECTIONS)


class DriftResult(msgspec.Struct, frozen=True):
    """One window's verdict. Per-feature lists (one entry for mmd); p_value is
    NaN for psi, which has a threshold instead of a test."""

    test: str
    backend: str
    statistic: list[float]
    p_value: list[float]
    p_adjusted: list[float]
    drift: list[bool]
    n_reference: int
    n_window: int

    @property
    def any_drift(self) -> bool:
        return any(self.drift)


def gpu_available() -> bool:
    try:
        importlib.import_module("flywheel.kernels._cupy")
    except Exception:  # noqa: BLE001 - no CuPy, no GPU, no driver: all mean no
        return False
    return True


def choose_backend(backend: str, test: type[DriftTest] | None = None) -> str:
    """The backend ``backend`` names for ``test``: ``auto`` is cupy where a
    GPU is present and the test has CuPy kernels, else numba (else numpy,
    for a test with no Numba kernels)."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} must be one of {BACKENDS}")
    if backend != "auto":
        return backend
    has = test.backends if test is not None else BACKENDS[1:]
    if "cupy" in has and gpu_available():
        return "cupy"
    return "numba" if "numba" in has else "numpy"


class DriftDetector:
    """A registered drift test on one backend, with the verdict's rules.

    test: a registered test name (``flywheel.kernels.drift.available_tests()``).
    backend: numpy, numba, cupy or auto (see the module docstring).
    nan_policy: ``raise`` or ``omit`` (continuous tests).
    correction / alpha: p-values are corrected across features (bh,
        bonferroni, none) and a feature drifts when its corrected p-value is
        below alpha (psi: when its index exceeds its ``threshold``).
    threads: Numba (and sorting) threads for the numba backend.
    **params: the test's own parameters, checked by its ``Params`` type
        (psi: ``threshold``; mmd: ``sigma``, ``n_permutations``, ``seed``);
        a parameter the test does not have is refused.

    Raises ConfigError naming the bad setting.
    """

    def __init__(
        self,
        test: str,
        *,
        backend: str = "auto",
        nan_policy: str = "raise",
        correction: str = "bh",
        alpha: float = 0.05,
        threads: int | None = None,
        **params: Any,
    ) -> None:
        cls = get_test(test)
        if correction not in CORRECTIONS:
            raise ConfigError(f"correction {correction!r} must be one of {CORRECTIONS}")
        if not 0 < alpha < 1:
            raise ConfigError("alpha must lie in (0, 1)")
        check_nans("", np.zeros((1, 1)), nan_policy)  # validates the policy name
        self.test, self.nan_policy, self.correction, self.alpha = test, nan_policy, correction, alpha
        self.params = cls.parse_params(params)
        self.backend = choose_backend(backend, cls)
        options = DriftOptions(nan_policy, threads, self.params)
        self._test: DriftTest = cls(self.backend, options)
        self._fitted = False

    @property
    def kind(self) -> str:
        """``continuous`` or ``categorical``: what the test reads."""
        return self._test.kind

    @property
    def joint(self) -> bool:
        """True when the test scores all features together (one result)."""
        return self._test.joint

    def fit(self, reference) -> DriftDetector:
        """Fit on the reference sample (rows x features); InvalidInputError
        names the input when the test cannot read it."""
        self._test.fit(reference)
        self._fitted = True
        return self

    def score(self, window) -> DriftResult:
        """Score one window (rows x features, as many features as the
        reference); InvalidInputError names the input when the test cannot
        read it."""
        if not self._fitted:
            raise RuntimeError("call fit(reference) first")
        scores = self._test.score(window)
        adj, drift = self._test.verdict(scores, self.correction, self.alpha)
        as_floats = lambda a: np.asarray(a, dtype=np.float64).tolist()  # noqa: E731 - Python floats, at C speed
        return DriftResult(
            self.test, self.backend, as_floats(scores.statistic), as_floats(scores.p_value), as_floats(adj),
            np.asarray(drift, dtype=bool).tolist(), self._test.n_reference, scores.n_window,
        )

    @property
    def bandwidth(self) -> float | None:
        """mmd's RBF bandwidth once fitted (None for other tests)."""
        return getattr(self._test, "bandwidth", None)
