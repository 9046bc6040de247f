"""CuPy GPU kernels, mirroring numba_kernels.py.

Imported only when the cupy backend is asked for (or auto-selected because a
GPU is present); without CuPy or a GPU, importing raises ImportError with an
install hint and the detector stays on the CPU. KS and CvM run one thread
per value (binary searches in the sorted reference and window columns, the
reference kept on the GPU from fit), not a serial merge per feature: 128
features are far too few threads for a GPU. Sorting, the RBF blocks and the
permutation products use CuPy's sort, cuBLAS and an ElementwiseKernel.
"""

from __future__ import annotations

import numpy as np

try:
    import cupy as cp
except ImportError as exc:
    raise ImportError("the cupy drift backend needs CuPy and a CUDA GPU: pip install cupy-cuda12x") from exc

if cp.cuda.runtime.getDeviceCount() < 1:  # pragma: no cover - depends on the machine
    raise ImportError("the cupy drift backend needs a CUDA GPU; none is visible")

_MERGE = r"""
// Binary searches in one sorted column: first index in [0, n) with a[i] >= x
// (lower) or a[i] > x (upper).
__device__ long long lower_idx(const double* a, long long n, double x) {
    long long lo = 0, hi = n;
    while (lo < hi) { long long mid = (lo + hi) >> 1; if (a[mid] < x) lo = mid + 1; else hi = mid; }
    return lo;
}
__device__ long long upper_idx(const double* a, long long n, double x) {
    long long lo = 0, hi = n;
    while (lo < hi) { long long mid = (lo + hi) >> 1; if (a[mid] <= x) lo = mid + 1; else hi = mid; }
    return lo;
}

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

extern "C" __global__ void bincount_columns(const long long* codes, long long rows, int nf,
                                            long long n_bins, unsigned long long* out) {
    long long k = (long long)blockDim.x * blockIdx.x + threadIdx.x;
    if (k >= rows * nf) return;
    long long r = k / nf, f = k % nf;
    long long c = codes[r * nf + f];
    if (c >= n_bins - 1) c = n_bins - 1;
    atomicAdd(&out[f * n_bins + c], 1ULL);
}
"""
_module = cp.RawModule(code=_MERGE)
_ks = _module.get_function("ks_candidates")
_cvm = _module.get_function("cvm_terms")
_bincount = _module.get_function("bincount_columns")
_rbf = cp.ElementwiseKernel("float64 d2, float64 gamma", "float64 k", "k = exp(-gamma * (d2 > 0 ? d2 : 0))", "fw_rbf")
_THREADS = 256


def to_device(ref_cols: np.ndarray, ref_len: np.ndarray):
    """The fitted reference (sorted columns, lengths) on the GPU, once: it
    is most of the data, and copying it per window cost more than scoring."""
    return cp.asarray(ref_cols), cp.asarray(ref_len)


def _window(win: np.ndarray):
    d_win = cp.sort(cp.asarray(np.ascontiguousarray(win.T)), axis=1)  # NaNs sort last
    return d_win, (~cp.isnan(d_win)).sum(axis=1).astype(cp.int64)


def ks_stat(ref, ref_len, win):
    """Per-feature KS statistics and the window's value counts."""
    d_ref, d_len = cp.asarray(ref), cp.asarray(ref_len)
    d_win, win_len = _window(win)
    nf, m = d_win.shape
    cand = cp.empty((nf, m), dtype=cp.float64)
    total = nf * m
    _ks(((total + _THREADS - 1) // _THREADS,), (_THREADS,),
        (d_ref, d_len, np.int64(d_ref.shape[1]), d_win, win_len, np.int64(m), cand, np.int32(nf)))
    return cp.asnumpy(cand.max(axis=1)), cp.asnumpy(win_len)


def cvm_u(ref, ref_len, win):
    """Per-feature CvM U (n sum (r_i - i)^2 + m sum (s_j - j)^2) and the
    window's value counts."""
    d_ref, d_len = cp.asarray(ref), cp.asarray(ref_len)
    d_win, win_len = _window(win)
    nf, m = d_win.shape
    ref_terms = cp.empty((nf, d_ref.shape[1]), dtype=cp.float64)
    win_terms = cp.empty((nf, m), dtype=cp.float64)
    total = ref_terms.size + win_terms.size
    _cvm(((total + _THREADS - 1) // _THREADS,), (_THREADS,),
         (d_ref, d_len, np.int64(d_ref.shape[1]), d_win, win_len, np.int64(m), ref_terms, win_terms,
          np.int32(nf)))
    return cp.asnumpy(ref_terms.sum(axis=1) + win_terms.sum(axis=1)), cp.asnumpy(win_len)


def bincount_columns(codes: np.ndarray, n_bins: int) -> np.ndarray:
    rows, nf = codes.shape
    d = cp.asarray(np.ascontiguousarray(codes, dtype=np.int64))
    out = cp.zeros((nf, n_bins), dtype=cp.uint64)
    total = rows * nf
    threads = 256
    _bincount(((total + threads - 1) // threads,), (threads,), (d, np.int64(rows), np.int32(nf), np.int64(n_bins), out))
    return cp.asnumpy(out).astype(np.int64)


def mmd_score(ref: np.ndarray, win: np.ndarray, gamma: float, perms: np.ndarray) -> tuple[float, np.ndarray]:
    """The permutation test on the GPU: pooled RBF matrix by cuBLAS + one
    elementwise kernel, permuted block sums as one matrix product."""
    from flywheel.kernels.mmd import mmd2_from_sums

    n, m = len(ref), len(win)
    z = cp.asarray(np.vstack([ref, win]), dtype=cp.float64)
    sq = (z * z).sum(axis=1)
    k = _rbf(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), gamma)
    observed = mmd2_from_sums(float(k[:n, :n].sum()), float(k[n:, n:].sum()), float(k[:n, n:].sum()), n, m)
    if not len(perms):
        return observed, np.empty(0)
    s = cp.zeros((n + m, len(perms)), dtype=cp.float64)
    s[cp.asarray(perms[:, :n].T), cp.arange(len(perms))[None, :]] = 1.0
    ks = k @ s
    a = (s * ks).sum(axis=0)
    rows = k.sum(axis=1)
    c = rows @ s - a
    b = float(k.sum()) - a - 2 * c
    permuted = (a - n) / (n * (n - 1)) + (b - m) / (m * (m - 1)) - 2.0 * c / (n * m)
    return observed, cp.asnumpy(permuted)
