"""The two-sample Cramér-von Mises test, per feature (continuous).

Statistic T from U = n sum (r_i - i)^2 + m sum (s_j - j)^2 over pooled
mid-ranks (Anderson 1962). P-value: ``scipy.stats.cramervonmises_2samp(
method="asymptotic")``, computed as ``stats.cvm_pvalues``. Kernels, side by
side: SciPy per feature (the reference), a Numba walk of the sorted window
through the sorted reference (each value found through a guide table) with
the reference's tie offsets (made on its first score, then kept),
and a CuPy kernel with one thread per value of either sample.
"""

from __future__ import annotations

import numpy as np

from flywheel.kernels import stats as st
from flywheel.kernels.drift._sorted import SortedColumnsTest


_CUDA = r"""
// Cramer-von Mises U = n sum_i (r_i - i)^2 + m sum_j (s_j - j)^2 over the
// pooled mid-ranks: one thread per value of either sample. A value's
// mid-rank is #ref < v + #win < v + (ties in both + 1) / 2, from four binary
// searches; term[k] gets its weighted squared deviation, summed per feature
// by the caller. Values past a column's length (NaNs) contribute 0.
extern "C" __global__ void cvm_terms(const double* ref, const long long* ref_len, long long ref_stride,
                                     const double* win, const long long* win_len, long long win_stride,
                                     double* ref_terms, double* win_terms, int nf) {
    long long k = (long long)blockDim.x * blockIdx.x + threadIdx.x;
    long long total_ref = (long long)nf * ref_stride;
    if (k >= total_ref + (long long)nf * win_stride) return;
    bool in_ref = k < total_ref;
    long long kk = in_ref ? k : k - total_ref;
    long long stride = in_ref ? ref_stride : win_stride;
    int f = (int)(kk / stride);
    long long i = kk % stride;
    long long n = ref_len[f], m = win_len[f];
    double* out = in_ref ? ref_terms : win_terms;
    if (i >= (in_ref ? n : m)) { out[kk] = 0.0; return; }
    const double* a = ref + f * ref_stride;
    const double* b = win + f * win_stride;
    double v = in_ref ? a[i] : b[i];
    long long la = lower_idx(a, n, v), ua = upper_idx(a, n, v);
    long long lb = lower_idx(b, m, v), ub = upper_idx(b, m, v);
    double rank = (double)(la + lb) + ((ua - la) + (ub - lb) + 1) / 2.0;
    double e = rank - (double)(i + 1);
    out[kk] = (in_ref ? (double)n : (double)m) * e * e;
}
"""


def cvm_u_cupy(ref, ref_len, win):
    """Per-feature CvM U (n sum (r_i - i)^2 + m sum (s_j - j)^2) and the
    window's value counts."""
    from flywheel.kernels import _cupy

    cp = _cupy.cp
    d_ref, d_len = cp.asarray(ref), cp.asarray(ref_len)
    d_win, win_len = _cupy.sorted_window(win)
    nf, m = d_win.shape
    ref_terms = cp.empty((nf, d_ref.shape[1]), dtype=cp.float64)
    win_terms = cp.empty((nf, m), dtype=cp.float64)
    total = ref_terms.size + win_terms.size
    _cupy.function(_cupy.SEARCH + _CUDA, "cvm_terms")(
        _cupy.blocks(total), (_cupy.THREADS,),
        (d_ref, d_len, np.int64(d_ref.shape[1]), d_win, win_len, np.int64(m), ref_terms, win_terms,
         np.int32(nf)),
    )
    return cp.asnumpy(ref_terms.sum(axis=1) + win_terms.sum(axis=1)), cp.asnumpy(win_len)


class CvMTest(SortedColumnsTest):
    """Cramér-von Mises on each feature; a window feature needs two values."""

    name = "cvm"
    min_values = 2

    def fit_data(self, data: np.ndarray) -> None:
        super().fit_data(data)
        self._ties: tuple | None = None  # the Numba kernel's, made on its first score

    def ties(self) -> tuple:
        """The reference's tie offsets (``_cvm_numba.ref_tie_offsets``) and
        which features have ties."""
        if self._ties is None:
            from flywheel.kernels.drift._cvm_numba import ref_tie_offsets

            d1, d2 = ref_tie_offsets(self._ref_cols, self._ref_len)
            self._ties = (d1, d2, d2[np.arange(len(d2)), self._ref_len] > 0)
        return self._ties

    def reference_test(self, a: np.ndarray, b: np.ndarray):
        from scipy.stats import cramervonmises_2samp

        return cramervonmises_2samp(a, b, method="asymptotic")

    def numba_scores(self, cols: np.ndarray, win_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from flywheel.kernels.drift._cvm_numba import cvm_stat

        t, p, tn = cvm_stat(self._ref_cols, self._ref_len, *self.guide(), *self.ties(), cols, win_len,
                         st.cvm_table(), st.CVM_TABLE_LOW, st.CVM_TABLE_STEP, st.CVM_TABLE_TOP)
        far = np.isnan(p)
        if far.any():
            p[far] = np.maximum(0.0, 1.0 - st.cdf_cvm_series(tn[far]))
        return t, p

    def cupy_raw(self, ref, ref_len, win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return cvm_u_cupy(ref, ref_len, win)

    def finish(self, raw: np.ndarray, win_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, m = self._ref_len.astype(np.float64), win_len.astype(np.float64)
        t = st.cvm_statistic(raw, n, m)
        return t, st.cvm_pvalues(t, n, m)
