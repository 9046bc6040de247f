"""CuPy helpers shared by several drift tests.

Imported only when the cupy backend is asked for (or auto-selected because a
GPU is present); without CuPy or a GPU, importing raises ImportError with an
install hint and the detector stays on the CPU. What more than one test
needs lives here: the compile cache, the binary searches in sorted columns
(device code for ks, cvm), the fitted reference and the sorted window on the
GPU, and the per-column bincount of categorical codes (chi2, psi). Each test's
own kernels live in its module under ``flywheel.kernels.drift``.
"""

from __future__ import annotations

import functools

import numpy as np

try:
    import cupy as cp
except ImportError as exc:
    raise ImportError("the cupy drift backend needs CuPy and a CUDA GPU: pip install cupy-cuda12x") from exc

if cp.cuda.runtime.getDeviceCount() < 1:  # pragma: no cover - depends on the machine
    raise ImportError("the cupy drift backend needs a CUDA GPU; none is visible")

THREADS = 256

SEARCH = r"""
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
"""

_BINCOUNT = r"""
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


@functools.cache
def _module(source: str):
    return cp.RawModule(code=source)


def function(source: str, name: str):
    """The kernel ``name`` of the CUDA ``source``, compiled once per process."""
    return _module(source).get_function(name)


def blocks(total: int) -> tuple[int]:
    """The grid for one thread per item, THREADS to a block."""
    return ((total + THREADS - 1) // THREADS,)


def to_device(ref_cols: np.ndarray, ref_len: np.ndarray):
    """The fitted reference (sorted columns, lengths) on the GPU, once: it
    is most of the data, and copying it per window cost more than scoring."""
    return cp.asarray(ref_cols), cp.asarray(ref_len)


def sorted_window(win: np.ndarray):
    """The window's per-feature sorted columns on the GPU and their counts
    of real values."""
    d_win = cp.sort(cp.asarray(np.ascontiguousarray(win.T)), axis=1)  # NaNs sort last
    return d_win, (~cp.isnan(d_win)).sum(axis=1).astype(cp.int64)


def bincount_columns(codes: np.ndarray, n_bins: int) -> np.ndarray:
    """(features x n_bins) counts of integer codes, as the Numba kernel of
    the same name counts them."""
    rows, nf = codes.shape
    d = cp.asarray(np.ascontiguousarray(codes, dtype=np.int64))
    out = cp.zeros((nf, n_bins), dtype=cp.uint64)
    total = rows * nf
    function(_BINCOUNT, "bincount_columns")(
        blocks(total), (THREADS,), (d, np.int64(rows), np.int32(nf), np.int64(n_bins), out)
    )
    return cp.asnumpy(out).astype(np.int64)
