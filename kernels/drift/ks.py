"""The two-sample Kolmogorov-Smirnov test, per feature (continuous).

Statistic: the largest gap between the two empirical CDFs. P-value:
``scipy.stats.ks_2samp(method="asymp")``, computed as ``stats.ks_pvalues``.
Kernels, side by side: SciPy per feature (the reference), a Numba kernel
that places the sorted window's values in the sorted reference through a
guide table (bounds from the table first, exact positions where they
matter), and a CuPy kernel with one thread per window value.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from scipy import stats as sps

from flywheel.kernels import stats as st
from flywheel.kernels._numba import guide_cell, guided_bounds, ks_series_p
from flywheel.kernels.drift._sorted import SortedColumnsTest


@njit(parallel=True, cache=True)
def ks_stat(ref, ref_len, lo, scale, guide, win, win_len):
    """Two-sample KS statistic per feature, and its p-value where the series
    gives it (NaN where SciPy must: ``_numba.ks_series_p``), computed here on
    the kernel's threads rather than after them.

    The ECDF gap can only peak just before or at a window value, so only the
    window's distinct values are visited, in two passes. A value's position
    in the reference lies within its guide cell (``_numba.py``), one or two
    values wide, so the first pass bounds each gap from the cell's ends
    alone, above and below, without reading the reference; the second finds
    the exact position only where the upper bound passes the best gap known.
    The maximum is the same, to the bit (the bounds are the same float
    expressions at the cell's ends, and monotone); on 1,000 x 32 against
    10,000 rows a few dozen values are looked up instead of 32,000."""
    nf, width = win.shape
    out = np.empty(nf)
    p = np.empty(nf)
    cells = guide.shape[1] - 1
    upper_all = np.empty((nf, width))
    end_all = np.empty((nf, width), dtype=np.int64)
    for f in prange(nf):
        n = ref_len[f]
        m = win_len[f]
        a = ref[f]
        b = win[f]
        row = guide[f]
        inv_n = 1.0 / n
        inv_m = 1.0 / m
        upper = upper_all[f]
        end = end_all[f]
        floor = 0.0
        j = 0
        while j < m:
            x = b[j]
            j1 = j + 1
            while j1 < m and b[j1] == x:
                j1 += 1
            c = guide_cell(x, lo[f], scale[f], cells)
            left = row[c] * inv_n
            right = row[c + 1] * inv_n
            before = j * inv_m
            at = j1 * inv_m
            upper[j] = max(abs(left - before), abs(right - before), abs(left - at), abs(right - at))
            floor = max(floor, left - before, before - right, left - at, at - right)
            end[j] = j1
            j = j1
        d = floor  # no gap is smaller than its distance to its cell: D is at least this
        j = 0
        while j < m:
            j1 = end[j]
            if upper[j] > d:
                il, ir = guided_bounds(a, row, lo[f], scale[f], b[j])
                d = max(d, abs(il * inv_n - j * inv_m), abs(ir * inv_n - j1 * inv_m))
            j = j1
        out[f] = d
        p[f] = ks_series_p(np.float64(n), np.float64(m), d)
    return out, p


_CUDA = r"""
// KS: one thread per (feature, window value). Both ECDFs are step functions,
// so sup |F_ref - F_win| is reached at a window value w (F_win - F_ref, just
// after its jump) or just below one (F_ref - F_win, F_win still flat): two
// candidates per window value, from binary searches in both sorted columns.
// cand[f * stride + j] gets the larger; the caller takes each row's max.
extern "C" __global__ void ks_candidates(const double* ref, const long long* ref_len, long long ref_stride,
                                         const double* win, const long long* win_len, long long win_stride,
                                         double* cand, int nf) {
    long long k = (long long)blockDim.x * blockIdx.x + threadIdx.x;
    if (k >= (long long)nf * win_stride) return;
    int f = (int)(k / win_stride);
    long long j = k % win_stride;
    long long n = ref_len[f], m = win_len[f];
    if (j >= m) { cand[k] = 0.0; return; }
    const double* a = ref + f * ref_stride;
    const double* b = win + f * win_stride;
    double w = b[j];
    double below = (double)lower_idx(a, n, w) / n - (double)lower_idx(b, m, w) / m;
    double at = (double)upper_idx(b, m, w) / m - (double)upper_idx(a, n, w) / n;
    double d = fabs(below) > fabs(at) ? fabs(below) : fabs(at);
    cand[k] = d;
}
"""


def ks_stat_cupy(ref, ref_len, win):
    """Per-feature KS statistics and the window's value counts."""
    from flywheel.kernels import _cupy

    cp = _cupy.cp
    d_ref, d_len = cp.asarray(ref), cp.asarray(ref_len)
    d_win, win_len = _cupy.sorted_window(win)
    nf, m = d_win.shape
    cand = cp.empty((nf, m), dtype=cp.float64)
    total = nf * m
    _cupy.function(_cupy.SEARCH + _CUDA, "ks_candidates")(
        _cupy.blocks(total), (_cupy.THREADS,),
        (d_ref, d_len, np.int64(d_ref.shape[1]), d_win, win_len, np.int64(m), cand, np.int32(nf)),
    )
    return cp.asnumpy(cand.max(axis=1)), cp.asnumpy(win_len)


class KSTest(SortedColumnsTest):
    """Kolmogorov-Smirnov on each feature; a window feature needs one value."""

    name = "ks"
    min_values = 1

    def reference_test(self, a: np.ndarray, b: np.ndarray):
        return sps.ks_2samp(a, b, method="asymp")

    def numba_scores(self, cols: np.ndarray, win_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d, p = ks_stat(self._ref_cols, self._ref_len, *self._guide, cols, win_len)
        rest = np.isnan(p)
        if rest.any():
            p[rest] = st.ks_pvalues(d[rest], self._ref_len[rest], win_len[rest])
        return d, p

    def cupy_raw(self, ref, ref_len, win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return ks_stat_cupy(ref, ref_len, win)

    def finish(self, raw: np.ndarray, win_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, m = self._ref_len.astype(np.float64), win_len.astype(np.float64)
        return raw, st.ks_pvalues(raw, n, m)
