"""The two-sample Cramér-von Mises test, per feature (continuous).

Statistic T from U = n sum (r_i - i)^2 + m sum (s_j - j)^2 over pooled
mid-ranks (Anderson 1962). P-value: ``scipy.stats.cramervonmises_2samp(
method="asymptotic")``, computed as ``stats.cvm_pvalues``. Kernels, side by
side: SciPy per feature (the reference), a Numba walk of the sorted window
through the sorted reference (each value found through a guide table) with
the reference's tie offsets kept from fit,
and a CuPy kernel with one thread per value of either sample.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from scipy import stats as sps

from flywheel.kernels import stats as st
from flywheel.kernels._numba import cvm_table_p, next_group
from flywheel.kernels.drift._sorted import SortedColumnsTest


def ref_tie_offsets(ref, ref_len):
    """Prefix sums of delta_t and delta_t^2, where delta_t is a reference
    value's average rank within its own ties minus its position (t + 1): what
    the CvM sum needs for stretches of the reference between window values."""
    nf, n = ref.shape
    d1 = np.zeros((nf, n + 1))
    d2 = np.zeros((nf, n + 1))
    _tie_offsets(ref, ref_len, d1, d2)
    return d1, d2


@njit(parallel=True, cache=True)
def _tie_offsets(ref, ref_len, d1, d2):
    for f in prange(ref.shape[0]):
        n = ref_len[f]
        t = 0
        while t < n:
            e = t + 1
            while e < n and ref[f, e] == ref[f, t]:
                e += 1
            avg = (t + 1 + e) / 2.0
            for k in range(t, e):
                delta = avg - (k + 1)
                d1[f, k + 1] = d1[f, k] + delta
                d2[f, k + 1] = d2[f, k] + delta * delta
            t = e


@njit(parallel=True, cache=True)
def cvm_stat(ref, ref_len, lo, scale, guide, d1, d2, tied, win, win_len, table, low, step, top):
    """The two-sample Cramér-von Mises statistic T per feature (pooled
    ranks, ties at their average rank), its p-value where the tabulated CDF
    reaches (NaN past ``top``: ``_numba.cvm_table_p``) and the normalised
    statistic. Window values are visited one by one, each found in the
    reference through its guide table (``_numba.py``); a stretch of
    reference values between two window values all sit j ranks above their
    own position (plus their in-reference tie offset), so its sum of squares
    comes from the prefix sums in O(1); a feature whose reference has no ties
    (``tied`` false) has no offsets, and its prefix sums are not read."""
    nf = ref.shape[0]
    out = np.empty(nf)
    p = np.empty(nf)
    tn = np.empty(nf)
    for f in prange(nf):
        n = ref_len[f]
        m = win_len[f]
        a = ref[f]
        b = win[f]
        row = guide[f]
        offsets = tied[f]
        i = 0
        j = 0
        sx = 0.0
        sy = 0.0
        while j < m:
            j1, il, ir = next_group(a, row, lo[f], scale[f], b, j, m)
            # reference stretch [i, il): each sits j ranks above its own rank
            cnt = il - i
            sx += cnt * j * j
            if offsets:
                sx += 2.0 * j * (d1[f, il] - d1[f, i]) + (d2[f, il] - d2[f, i])
            # the group tied at x: ref [il, ir) and window [j, j1)
            rank = il + j + (ir - il + j1 - j + 1) / 2.0
            for t in range(il, ir):
                e = rank - (t + 1)
                sx += e * e
            for t in range(j, j1):
                e = rank - (t + 1)
                sy += e * e
            i = ir
            j = j1
        cnt = n - i
        sx += cnt * m * m
        if offsets:
            sx += 2.0 * m * (d1[f, n] - d1[f, i]) + (d2[f, n] - d2[f, i])
        # T from U (eq. 9 of Anderson 1962, as stats.cvm_statistic), then its
        # p-value from the table where it reaches (NaN past it)
        nx = np.float64(n)
        ny = np.float64(m)
        k = nx * ny
        big_n = nx + ny
        t = (n * sx + m * sy) / (k * big_n) - (4 * k - 1) / (6 * big_n)
        out[f] = t
        p[f], tn[f] = cvm_table_p(t, nx, ny, table, low, step, top)
    return out, p, tn


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
        if self.backend == "numba":
            d1, d2 = ref_tie_offsets(self._ref_cols, self._ref_len)
            self._ties = (d1, d2, d2[np.arange(len(d2)), self._ref_len] > 0)

    def reference_test(self, a: np.ndarray, b: np.ndarray):
        return sps.cramervonmises_2samp(a, b, method="asymptotic")

    def numba_scores(self, cols: np.ndarray, win_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t, p, tn = cvm_stat(self._ref_cols, self._ref_len, *self._guide, *self._ties, cols, win_len,
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
