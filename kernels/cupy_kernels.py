"""CuPy GPU kernels, mirroring numba_kernels.py.

Imported only when the cupy backend is asked for (or auto-selected because a
GPU is present); without CuPy or a GPU, importing raises ImportError with an
install hint and the detector stays on the CPU. The merge kernels run one
thread per feature (the same O(n + m) merge as on the CPU); sorting, the RBF
blocks and the permutation products use CuPy's sort, cuBLAS and an
ElementwiseKernel.
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
extern "C" __global__ void ks_stat(const double* ref, const long long* ref_len, long long ref_stride,
                                   const double* win, const long long* win_len, long long win_stride,
                                   double* out, int nf) {
    int f = blockDim.x * blockIdx.x + threadIdx.x;
    if (f >= nf) return;
    const double* a = ref + f * ref_stride;
    const double* b = win + f * win_stride;
    long long n = ref_len[f], m = win_len[f], i = 0, j = 0;
    double d = 0.0;
    while (i < n && j < m) {
        double x = a[i] <= b[j] ? a[i] : b[j];
        while (i < n && a[i] <= x) i++;
        while (j < m && b[j] <= x) j++;
        double diff = fabs((double)i / n - (double)j / m);
        if (diff > d) d = diff;
    }
    out[f] = d;
}

extern "C" __global__ void cvm_u(const double* ref, const long long* ref_len, long long ref_stride,
                                 const double* win, const long long* win_len, long long win_stride,
                                 double* out, int nf) {
    int f = blockDim.x * blockIdx.x + threadIdx.x;
    if (f >= nf) return;
    const double* a = ref + f * ref_stride;
    const double* b = win + f * win_stride;
    long long n = ref_len[f], m = win_len[f], i = 0, j = 0;
    double sx = 0.0, sy = 0.0;
    while (i < n || j < m) {
        double v = (j >= m || (i < n && a[i] <= b[j])) ? a[i] : b[j];
        long long ca = 0, cb = 0;
        while (i + ca < n && a[i + ca] == v) ca++;
        while (j + cb < m && b[j + cb] == v) cb++;
        double rank = i + j + (ca + cb + 1) / 2.0;
        for (long long t = 0; t < ca; t++) { double e = rank - (i + t + 1); sx += e * e; }
        for (long long t = 0; t < cb; t++) { double e = rank - (j + t + 1); sy += e * e; }
        i += ca; j += cb;
    }
    out[f] = n * sx + m * sy;
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
_ks = _module.get_function("ks_stat")
_cvm = _module.get_function("cvm_u")
_bincount = _module.get_function("bincount_columns")
_rbf = cp.ElementwiseKernel("float64 d2, float64 gamma", "float64 k", "k = exp(-gamma * (d2 > 0 ? d2 : 0))", "fw_rbf")


def _merge(kernel, ref: np.ndarray, ref_len: np.ndarray, win: np.ndarray) -> np.ndarray:
    nf = ref.shape[0]
    d_ref = cp.asarray(ref)
    d_win = cp.sort(cp.asarray(np.ascontiguousarray(win.T)), axis=1)  # NaNs sort last
    win_len = (~cp.isnan(d_win)).sum(axis=1).astype(cp.int64)
    out = cp.empty(nf, dtype=cp.float64)
    threads = 128
    kernel(((nf + threads - 1) // threads,), (threads,),
           (d_ref, cp.asarray(ref_len), np.int64(ref.shape[1]), d_win, win_len, np.int64(d_win.shape[1]),
            out, np.int32(nf)))
    return cp.asnumpy(out), cp.asnumpy(win_len)


def ks_stat(ref, ref_len, win):
    return _merge(_ks, ref, ref_len, win)


def cvm_u(ref, ref_len, win):
    return _merge(_cvm, ref, ref_len, win)


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
