"""The two-sample Kolmogorov-Smirnov test, per feature (continuous).

Statistic: the largest gap between the two empirical CDFs. P-value:
``scipy.stats.ks_2samp(method="asymp")``, computed as ``stats.ks_pvalues``.
Kernels, side by side: SciPy per feature (the reference), a Numba kernel
that finds each value of the sorted window in the sorted reference through a
guide table, and a CuPy kernel with one thread per window value.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from scipy import stats as sps

from flywheel.kernels import stats as st
from flywheel.kernels._numba import next_group
from flywheel.kernels.drift._sorted import SortedColumnsTest


@njit(parallel=True, cache=True)
def ks_stat(ref, ref_len, lo, scale, guide, win, win_len):
    """Two-sample KS statistic per feature. The ECDF gap can only peak just
    before or at a window value, so we visit the window's distinct values and
    find each in the reference through its guide table (``_numba.py``)."""
    nf = ref.shape[0]
    out = np.empty(nf)
    for f in prange(nf):
        n = ref_len[f]
        m = win_len[f]
        a = ref[f]
        b = win[f]
        row = guide[f]
        inv_n = 1.0 / n
        inv_m = 1.0 / m
        j = 0
        d = 0.0
        while j < m:
            j1, il, ir = next_group(a, row, lo[f], scale[f], b, j, m)
            d = max(d, abs(il * inv_n - j * inv_m), abs(ir * inv_n - j1 * inv_m))
            j = j1
        out[f] = d
    return out


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

    def numba_raw(self, cols: np.ndarray, win_len: np.ndarray) -> np.ndarray:
        return ks_stat(self._ref_cols, self._ref_len, *self._guide, cols, win_len)

    def cupy_raw(self, ref, ref_len, win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return ks_stat_cupy(ref, ref_len, win)

    def finish(self, raw: np.ndarray, win_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, m = self._ref_len.astype(np.float64), win_len.astype(np.float64)
        return raw, st.ks_pvalues(raw, n, m)
