"""The interface every drift test implements, and what the tests share.

A test is one class: it reads and checks its input (continuous values or
categorical integer codes), fits once on the reference, then scores windows
on the backend it was built for, with its NumPy/SciPy reference, Numba and
CuPy kernels side by side as ``score_numpy``, ``score_numba`` and
``score_cupy``. :class:`~flywheel.kernels.DriftDetector` adds what is the same
for every test (backend choice, multiple-testing correction, the verdict's
shape), so a test only computes statistics and p-values.

Thread-safety: ``score`` may run concurrently with itself; ``fit`` may not.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import msgspec

import numpy as np

from flywheel.kernels._checks import as_codes, as_matrix, check_nans
from flywheel.protocol.errors import ConfigError

KINDS = ("continuous", "categorical")
KERNEL_BACKENDS = ("numpy", "numba", "cupy")


@dataclass(frozen=True)
class DriftOptions:
    """The detector's settings a test reads.

    nan_policy: ``raise`` or ``omit`` (continuous tests drop NaNs per feature,
        mmd drops rows holding one).
    threads: Numba threads (and sorting threads) for the numba backend.
    params: the test's own parameters, an instance of its ``Params`` type
        (None for a test without parameters); see :meth:`DriftTest.parse_params`.
    """

    nan_policy: str = "raise"
    threads: int | None = None
    params: Any = None


class Scores(NamedTuple):
    """One window's raw scores: per feature (one entry for a joint test)."""

    statistic: np.ndarray
    p_value: np.ndarray
    n_window: int


# the thread count numba_threads() last gave Numba on each thread
_NUMBA_THREADS = threading.local()


class DriftTest(abc.ABC):
    """One two-sample drift test.

    Class attributes a test declares:
        name: its registry name (``ks``).
        kind: ``continuous`` (float features) or ``categorical``
            (non-negative integer codes, e.g. label-encoded features).
        backends: the kernels it has, among numpy, numba and cupy; each
            needs a ``score_<backend>(data)`` method returning
            (statistic, p_value) arrays.
        joint: True when it scores all features together (one result, mmd)
            instead of one result per feature.
        Params: a frozen ``msgspec.Struct`` of the test's own parameters with
            their defaults (``forbid_unknown_fields=True``; checks in
            ``__post_init__`` raise ConfigError), or None when it has none.
            The detector's keyword arguments and serving's
            ``drift.params.<test>`` are decoded into it, so a test with
            parameters is still one file.

    After ``fit``: ``features`` (columns of the reference) and
    ``n_reference`` (its rows, as the test counts them).
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    backends: ClassVar[tuple[str, ...]] = KERNEL_BACKENDS
    joint: ClassVar[bool] = False
    Params: ClassVar[type | None] = None
    # whether fit_data runs Numba kernels (the sorted-column tests make theirs
    # on the first score, so that fitting them does not load Numba)
    numba_at_fit: ClassVar[bool] = True

    @classmethod
    def parse_params(cls, raw: Mapping[str, Any] | None) -> Any:
        """``raw`` as this test's ``Params``; ConfigError naming the test and
        the parameter when one is unknown or out of range."""
        if cls.Params is None:
            if raw:
                raise ConfigError(f"test {cls.name!r} takes no parameters (got {', '.join(sorted(raw))})")
            return None
        try:
            return msgspec.convert(dict(raw or {}), cls.Params, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"parameters of test {cls.name!r}: {exc}") from None

    def __init__(self, backend: str, options: DriftOptions) -> None:
        if backend not in self.backends:
            raise ConfigError(f"test {self.name!r} has no {backend!r} backend; it has {self.backends}")
        self.backend, self.options = backend, options
        self.params = options.params if options.params is not None else self.parse_params(None)
        self._kernel = getattr(self, f"score_{backend}")
        self.features = 0
        self.n_reference = 0

    def numba_threads(self) -> None:
        """Apply ``options.threads`` to Numba on the calling thread. Numba's
        thread count is per thread, and a detector is often fitted on one
        thread and scores on another (the drift monitor's worker), so each
        entry to a Numba kernel calls this; it loads Numba only then."""
        threads = self.options.threads
        if self.backend == "numba" and threads and getattr(_NUMBA_THREADS, "count", None) != threads:
            from flywheel.kernels._numba import set_threads

            set_threads(threads)
            _NUMBA_THREADS.count = threads

    @abc.abstractmethod
    def read(self, name: str, x, *, features: int | None = None) -> np.ndarray:
        """``x`` as this test's input array (rows x features), checked;
        errors name the input (``reference``, ``window``)."""

    @abc.abstractmethod
    def fit_data(self, data: np.ndarray) -> None:
        """Keep what scoring needs from the checked reference."""

    def fit(self, reference) -> None:
        data = self.read("reference", reference)
        self.features = data.shape[1]
        self.n_reference = len(data)
        if self.numba_at_fit:
            self.numba_threads()
        self.fit_data(data)

    def score(self, window) -> Scores:
        data = self.read("window", window, features=self.features)
        self.numba_threads()
        stat, p = self._kernel(data)
        return Scores(stat, p, len(data))

    def verdict(self, scores: Scores, correction: str, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """The corrected p-values and each feature's drift flag."""
        from flywheel.kernels.stats import CORRECTIONS  # SciPy: not on the import of the registry

        adjusted = CORRECTIONS[correction](scores.p_value)
        return adjusted, adjusted < alpha


class ContinuousTest(DriftTest):
    """A test of float features: finite values, NaNs as ``nan_policy`` says."""

    kind: ClassVar[str] = "continuous"

    def read(self, name: str, x, *, features: int | None = None) -> np.ndarray:
        arr = as_matrix(name, x, features=features)
        check_nans(name, arr, self.options.nan_policy)
        return arr


class CategoricalTest(DriftTest):
    """A test of categorical features given as non-negative integer codes
    (integral floats are accepted, so float rows from serving work; anything
    else is refused naming the input). Fitting keeps the reference's counts
    per category, plus one bin for categories the reference never saw."""

    kind: ClassVar[str] = "categorical"

    def read(self, name: str, x, *, features: int | None = None) -> np.ndarray:
        return as_codes(name, x, features=features)

    def fit_data(self, data: np.ndarray) -> None:
        self._bins = int(data.max()) + 2  # + one bin for categories never seen here
        self._ref_counts = self.counts(data)

    def counts(self, codes: np.ndarray) -> np.ndarray:
        """(features x bins) counts of ``codes`` on this test's backend."""
        if self.backend == "numpy":
            clipped = np.minimum(codes, self._bins - 1)
            return np.stack([np.bincount(clipped[:, f], minlength=self._bins) for f in range(codes.shape[1])])
        if self.backend == "cupy":
            from flywheel.kernels import _cupy as kernels
        else:
            from flywheel.kernels import _numba as kernels
        return kernels.bincount_columns(np.ascontiguousarray(codes), self._bins)
