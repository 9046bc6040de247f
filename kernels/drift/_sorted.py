"""What the per-feature rank tests (ks, cvm) share: sorted columns.

Fitting keeps the reference's per-feature sorted values (features x rows,
NaNs last) and counts of real values; a window is sorted the same way on each
backend and handed to the test's kernel, which returns a raw statistic per
feature that the test turns into (statistic, p-value). The NumPy reference
scores one feature at a time with the test's SciPy function instead.
"""

from __future__ import annotations

import abc
import os
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import numpy as np

from flywheel.kernels._checks import as_matrix, check_counted, sorted_columns
from flywheel.kernels.drift.base import ContinuousTest, DriftOptions, Scores
from flywheel.protocol.errors import InvalidInputError


def sort_pool(threads: int | None) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, threads or os.cpu_count() or 1), thread_name_prefix="fw-drift-sort")


# Below this many values a window is sorted in one call on the calling
# thread: handing chunks to the pool and waiting for them cost more than the
# second core saved (1,000 x 32: 0.22 ms through the pool, 0.12 ms in one
# call; 10,000 x 32: 3.5 against 3.1 ms; 100,000 x 8: 5.3 against 6.3 ms, the
# pool ahead). bench/drift.py prints both paths' times.
POOL_MIN_VALUES = 500_000


def sort_columns(win: np.ndarray, pool: ThreadPoolExecutor | None) -> np.ndarray:
    """Per-feature sorted window as (features, rows), NaNs last."""
    cols = np.ascontiguousarray(win.T)
    sort_in_place(cols, pool)
    return cols


def sort_in_place(cols: np.ndarray, pool: ThreadPoolExecutor | None) -> None:
    """Sort each row of ``cols`` (features, rows), NaNs last. NumPy's sort
    beats Numba's here and releases the GIL, so a large window is sorted in
    chunks of features on a few threads at once (``pool``; None: never)."""
    if pool is None or cols.size < POOL_MIN_VALUES:
        cols.sort(axis=1)
        return
    chunks = np.array_split(np.arange(cols.shape[0]), getattr(pool, "_max_workers", 1))

    def work(idx: np.ndarray) -> None:
        if len(idx):
            cols[idx[0] : idx[-1] + 1].sort(axis=1)

    list(pool.map(work, chunks))


class SortedColumnsTest(ContinuousTest):
    """Base of ks and cvm. A subclass gives ``min_values`` (real values a
    window feature needs), ``reference_test`` (SciPy on one feature),
    ``numba_scores`` and ``cupy_raw`` (its kernels) and ``finish`` (the
    CuPy kernel's raw statistic to statistic and p-value)."""

    min_values: ClassVar[int] = 1
    numba_at_fit: ClassVar[bool] = False

    def __init__(self, backend: str, options: DriftOptions) -> None:
        super().__init__(backend, options)
        self._pool = sort_pool(options.threads) if backend == "numba" else None

    def fit_data(self, data: np.ndarray) -> None:
        self._ref_cols, self._ref_len = sorted_columns(data)
        if (self._ref_len < 1).any():
            raise InvalidInputError(f"reference feature {int(np.argmin(self._ref_len))} has no values")
        self._ref = data
        self._ref_dev = None  # the cupy backend's copy, made on first score
        # the Numba kernels' guide table, made on their first score: fitting
        # does not load Numba, so a drift monitor's replica starts without it
        self._guide: tuple | None = None

    def guide(self) -> tuple:
        """The reference's guide table (``_numba.guide_table``)."""
        if self._guide is None:
            from flywheel.kernels._numba import guide_table

            self._guide = guide_table(self._ref_cols, self._ref_len)
        return self._guide

    def need_values(self, feature: int, count: int) -> None:
        if count < self.min_values:
            raise InvalidInputError(
                f"window feature {feature} has {count} values (after dropping NaN); need {self.min_values}"
            )

    def _check_counts(self, win_len: np.ndarray) -> None:
        if win_len.min() < self.min_values:
            f = int(np.flatnonzero(win_len < self.min_values)[0])
            self.need_values(f, int(win_len[f]))

    # -- the three backends -----------------------------------------------------
    def score_numpy(self, win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        stat, p = [], []
        for f in range(self.features):
            a = self._ref[:, f][~np.isnan(self._ref[:, f])]
            b = win[:, f][~np.isnan(win[:, f])]
            self.need_values(f, len(b))
            r = self.reference_test(a, b)
            stat.append(r.statistic)
            p.append(r.pvalue)
        return np.array(stat), np.array(p)

    def score(self, window) -> Scores:
        if self.backend != "numba":
            return super().score(window)
        from flywheel.kernels._numba import gather_columns

        self.numba_threads()
        # the window is checked while its columns are gathered: one pass, not
        # the three of read() (on a 1,000 x 32 window they cost a fifth of it)
        win = as_matrix("window", window, features=self.features)
        cols, win_len, has_inf = gather_columns(win)
        check_counted("window", win_len < len(win), has_inf, self.options.nan_policy)
        return Scores(*self._score_columns(cols, win_len), len(win))

    def score_numba(self, win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from flywheel.kernels._numba import gather_columns

        return self._score_columns(*gather_columns(win)[:2])

    def _score_columns(self, cols: np.ndarray, win_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sort_in_place(cols, self._pool)
        self._check_counts(win_len)
        return self.numba_scores(cols, win_len)

    def score_cupy(self, win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from flywheel.kernels import _cupy

        if self._ref_dev is None:
            self._ref_dev = _cupy.to_device(self._ref_cols, self._ref_len)
        raw, win_len = self.cupy_raw(*self._ref_dev, win)
        self._check_counts(win_len)
        return self.finish(raw, win_len)

    # -- what each test gives ---------------------------------------------------
    @abc.abstractmethod
    def reference_test(self, a: np.ndarray, b: np.ndarray):
        """SciPy's two-sample test on one feature's values (NaNs dropped)."""

    @abc.abstractmethod
    def numba_scores(self, cols: np.ndarray, win_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(statistic, p-value) per feature from the sorted window columns,
        p-values computed in the kernel where it can."""

    @abc.abstractmethod
    def cupy_raw(self, ref, ref_len, win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The raw statistic per feature and the window's counts of real
        values, from the reference on the GPU and the unsorted window."""

    @abc.abstractmethod
    def finish(self, raw: np.ndarray, win_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(statistic, p-value) per feature from the raw statistic."""
