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

from flywheel.kernels import stats as st
from flywheel.kernels.drift._sorted import SortedColumnsTest


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
        from scipy.stats import ks_2samp

        return ks_2samp(a, b, method="asymp")

    def numba_scores(self, cols: np.ndarray, win_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from flywheel.kernels.drift._ks_numba import ks_stat

        d, p = ks_stat(self._ref_cols, self._ref_len, *self.guide(), cols, win_len)
        rest = np.isnan(p)
        if rest.any():
            p[rest] = st.ks_pvalues(d[rest], self._ref_len[rest], win_len[rest])
        return d, p

    def cupy_raw(self, ref, ref_len, win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return ks_stat_cupy(ref, ref_len, win)

    def finish(self, raw: np.ndarray, win_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, m = self._ref_len.astype(np.float64), win_len.astype(np.float64)
        return raw, st.ks_pvalues(raw, n, m)
