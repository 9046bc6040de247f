"""Drift detectors: fit once on the reference, then score many live windows.

    det = DriftDetector("ks", backend="auto").fit(reference)   # rows x features
    result = det.score(window)        # per-feature statistic, p-value, flag

Tests: ``ks`` and ``cvm`` (continuous features, per feature), ``chi2`` and
``psi`` (categorical integer codes, per feature), ``mmd`` (all features
jointly, RBF kernel, permutation test). Backends: ``numpy`` (the NumPy/SciPy
reference), ``numba`` (CPU kernels), ``cupy`` (GPU kernels), or ``auto``
(cupy when a GPU and CuPy are present, else numba). What fitting keeps: the
sorted reference columns (ks, cvm), the reference counts (chi2, psi), the
reference kernel block and bandwidth (mmd); a window only pays for itself.

Thread-safety: ``score`` may run concurrently with itself; ``fit`` may not.
"""

from __future__ import annotations

import importlib
import os
from concurrent.futures import ThreadPoolExecutor

import msgspec
import numpy as np
from scipy import stats as sps

from flywheel.kernels import mmd as mmd_mod
from flywheel.kernels import stats as st
from flywheel.kernels._checks import as_codes, as_matrix, check_nans, sorted_columns
from flywheel.protocol.errors import ConfigError, InvalidInputError

TESTS = ("ks", "cvm", "chi2", "psi", "mmd")
BACKENDS = ("auto", "numpy", "numba", "cupy")
CORRECTIONS = ("bh", "bonferroni", "none")


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
        importlib.import_module("flywheel.kernels.cupy_kernels")
    except Exception:  # noqa: BLE001 - no CuPy, no GPU, no driver: all mean no
        return False
    return True


def _sort_pool(threads: int | None) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, threads or os.cpu_count() or 1), thread_name_prefix="fw-drift-sort")


def sort_columns(win: np.ndarray, pool: ThreadPoolExecutor) -> np.ndarray:
    """Per-feature sorted window as (features, rows), NaNs last. NumPy's sort
    beats Numba's here and releases the GIL, so chunks of features are
    sorted on a few threads at once."""
    cols = np.ascontiguousarray(win.T)
    chunks = np.array_split(np.arange(cols.shape[0]), getattr(pool, "_max_workers", 1))

    def work(idx: np.ndarray) -> None:
        if len(idx):
            cols[idx[0] : idx[-1] + 1].sort(axis=1)

    list(pool.map(work, chunks))
    return cols


def choose_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} must be one of {BACKENDS}")
    if backend == "auto":
        return "cupy" if gpu_available() else "numba"
    return backend


class DriftDetector:
    def __init__(
        self,
        test: str,
        *,
        backend: str = "auto",
        nan_policy: str = "raise",
        correction: str = "bh",
        alpha: float = 0.05,
        psi_threshold: float = 0.2,
        sigma: float | None = None,
        n_permutations: int = 100,
        seed: int = 0,
        threads: int | None = None,
    ) -> None:
        if test not in TESTS:
            raise ConfigError(f"test {test!r} must be one of {TESTS}")
        if correction not in CORRECTIONS:
            raise ConfigError(f"correction {correction!r} must be one of {CORRECTIONS}")
        if not 0 < alpha < 1:
            raise ConfigError("alpha must lie in (0, 1)")
        if n_permutations < 0:
            raise ConfigError("n_permutations must be >= 0")
        if sigma is not None and sigma <= 0:
            raise ConfigError("sigma must be > 0")
        check_nans("", np.zeros((1, 1)), nan_policy)  # validates the policy name
        self.test, self.nan_policy, self.correction, self.alpha = test, nan_policy, correction, alpha
        self.psi_threshold, self.sigma, self.n_permutations, self.seed = psi_threshold, sigma, n_permutations, seed
        self.backend = choose_backend(backend)
        self._k = None
        self._pool = None
        if self.backend == "numba":
            self._pool = _sort_pool(threads)
            self._k = importlib.import_module("flywheel.kernels.numba_kernels")
            if threads:
                self._k.set_threads(threads)
        elif self.backend == "cupy":
            self._k = importlib.import_module("flywheel.kernels.cupy_kernels")
        self._fitted = False

    # -- fit ----------------------------------------------------------------
    def fit(self, reference) -> DriftDetector:
        if self.test in ("chi2", "psi"):
            codes = as_codes("reference", reference)
            self._features = codes.shape[1]
            self._bins = int(codes.max()) + 2  # + one bin for categories never seen here
            self._ref_counts = self._counts(codes)
            self._n_ref = len(codes)
        else:
            ref = as_matrix("reference", reference)
            check_nans("reference", ref, self.nan_policy)
            self._features = ref.shape[1]
            if self.test == "mmd":
                ref = ref[~np.isnan(ref).any(axis=1)]
                if len(ref) < 2:
                    raise InvalidInputError("mmd needs at least 2 reference rows without NaN")
                self._sigma = self.sigma or mmd_mod.median_bandwidth(ref, self.seed)
                self._ref = ref
                if self.backend == "numba":
                    self._mmd_fit = mmd_mod.mmd_fit_fast(ref, self._sigma)
            else:
                self._ref_cols, self._ref_len = sorted_columns(ref)
                if (self._ref_len < 1).any():
                    raise InvalidInputError(f"reference feature {int(np.argmin(self._ref_len))} has no values")
                self._ref = ref
                self._ref_dev = None  # the cupy backend's copy, made on first score
                if self.backend == "numba" and self.test == "cvm":
                    self._ties = self._k.ref_tie_offsets(self._ref_cols, self._ref_len)
            self._n_ref = len(ref)
        self._fitted = True
        return self

    def _counts(self, codes: np.ndarray) -> np.ndarray:
        if self.backend == "numpy":
            clipped = np.minimum(codes, self._bins - 1)
            return np.stack([np.bincount(clipped[:, f], minlength=self._bins) for f in range(codes.shape[1])])
        return self._k.bincount_columns(np.ascontiguousarray(codes), self._bins)

    # -- score --------------------------------------------------------------
    def score(self, window) -> DriftResult:
        if not self._fitted:
            raise RuntimeError("call fit(reference) first")
        if self.test in ("chi2", "psi"):
            codes = as_codes("window", window, features=self._features)
            stat, p = self._score_categorical(codes)
            n_win = len(codes)
        else:
            win = as_matrix("window", window, features=self._features)
            check_nans("window", win, self.nan_policy)
            n_win = len(win)
            if self.test == "mmd":
                stat, p = self._score_mmd(win)
            else:
                stat, p = self._score_continuous(win)
        if self.test == "psi":
            adj = p
            drift = stat > self.psi_threshold
        else:
            adj = {"bh": st.benjamini_hochberg, "bonferroni": st.bonferroni, "none": np.asarray}[self.correction](p)
            drift = adj < self.alpha
        return DriftResult(
            self.test, self.backend, [float(x) for x in stat], [float(x) for x in p],
            [float(x) for x in adj], [bool(x) for x in drift], self._n_ref, n_win,
        )

    def _score_continuous(self, win: np.ndarray):
        if self.backend == "numpy":
            stat, p = [], []
            for f in range(self._features):
                a = self._ref[:, f][~np.isnan(self._ref[:, f])]
                b = win[:, f][~np.isnan(win[:, f])]
                self._need_values(f, len(b))
                if self.test == "ks":
                    r = sps.ks_2samp(a, b, method="asymp")
                else:
                    r = sps.cramervonmises_2samp(a, b, method="asymptotic")
                stat.append(r.statistic)
                p.append(r.pvalue)
            return np.array(stat), np.array(p)
        if self.backend == "cupy":
            if self._ref_dev is None:
                self._ref_dev = self._k.to_device(self._ref_cols, self._ref_len)
            raw, win_len = (self._k.ks_stat if self.test == "ks" else self._k.cvm_u)(*self._ref_dev, win)
            for f in np.flatnonzero(win_len < (2 if self.test == "cvm" else 1)):
                self._need_values(int(f), int(win_len[f]))
        else:
            cols = sort_columns(win, self._pool)
            win_len = (~np.isnan(cols)).sum(axis=1).astype(np.int64)
            for f in np.flatnonzero(win_len < (2 if self.test == "cvm" else 1)):
                self._need_values(int(f), int(win_len[f]))
            if self.test == "ks":
                raw = self._k.ks_stat(self._ref_cols, self._ref_len, cols, win_len)
            else:
                raw = self._k.cvm_u(self._ref_cols, self._ref_len, *self._ties, cols, win_len)
        n, m = self._ref_len.astype(np.float64), win_len.astype(np.float64)
        if self.test == "ks":
            return raw, st.ks_pvalues(raw, n, m)
        t = st.cvm_statistic(raw, n, m)
        return t, st.cvm_pvalues(t, n, m)

    def _need_values(self, feature: int, count: int) -> None:
        need = 2 if self.test == "cvm" else 1
        if count < need:
            raise InvalidInputError(f"window feature {feature} has {count} values (after dropping NaN); need {need}")

    def _score_categorical(self, codes: np.ndarray):
        counts = self._counts(codes)
        if self.test == "psi":
            return st.psi_from_counts(self._ref_counts, counts), np.full(self._features, np.nan)
        if self.backend == "numpy":
            stat, p = [], []
            for f in range(self._features):
                table = np.stack([self._ref_counts[f], counts[f]])
                table = table[:, table.sum(axis=0) > 0]
                if table.shape[1] < 2:
                    stat.append(0.0)
                    p.append(1.0)
                    continue
                r = sps.chi2_contingency(table, correction=False)
                stat.append(r.statistic)
                p.append(r.pvalue)
            return np.array(stat), np.array(p)
        return st.chi2_from_counts(self._ref_counts, counts)

    def _score_mmd(self, win: np.ndarray):
        win = win[~np.isnan(win).any(axis=1)]
        if len(win) < 2:
            raise InvalidInputError("mmd needs at least 2 window rows without NaN")
        perms = mmd_mod.permutations(len(self._ref), len(win), self.n_permutations, self.seed)
        if self.backend == "numpy":
            obs, permuted = mmd_mod.mmd_reference(self._ref, win, self._sigma, perms)
        elif self.backend == "cupy":
            obs, permuted = self._k.mmd_score(self._ref, win, 1.0 / (2 * self._sigma**2), perms)
        else:
            obs, permuted = mmd_mod.mmd_score_fast(self._mmd_fit, win, perms)
        p = st.permutation_pvalue(obs, permuted) if len(permuted) else float("nan")
        return np.array([obs]), np.array([p])

    @property
    def bandwidth(self) -> float | None:
        return getattr(self, "_sigma", None)
