"""Numba helpers shared by several drift tests.

What more than one test needs: the thread count, the galloping searches that
walk a sorted window through a sorted reference (ks, cvm), the per-column
bincount of categorical codes (chi2, psi) and the Pelz-Good KS tail
(``stats.ks_pvalues``). Each test's own kernels live in its module under
``flywheel.kernels.drift``. Inputs of the sorted-column kernels are per-feature
sorted values as (features, rows) C-contiguous arrays with NaNs sorted last
and each feature's count of real values.

Numba's on-disk cache only watches the file a cached function is defined in:
after editing a helper here, delete the ``__pycache__`` folders under
``kernels/`` (or set NUMBA_CACHE_DIR elsewhere) so that the kernels calling it
are compiled again.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
    from numba import njit, prange
except ImportError as exc:  # pragma: no cover - numba is a core dependency
    raise ImportError("the numba drift backend needs numba: pip install numba") from exc


def set_threads(n: int) -> None:
    """Numba ignores OMP_NUM_THREADS=1 that Ray sets in its workers; callers
    that share a machine set the thread count explicitly."""
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


@njit(cache=True)
def _lower_bound(a, lo, hi, x):
    """First index in [lo, hi) with a[i] >= x, galloping from lo: the search
    moves forward monotonically, so its cost is log(distance), not log(n)."""
    step = 1
    while lo + step < hi and a[lo + step - 1] < x:
        lo += step
        step *= 2
    top = min(lo + step, hi)
    while lo < top:
        mid = (lo + top) // 2
        if a[mid] < x:
            lo = mid + 1
        else:
            top = mid
    return lo


@njit(cache=True)
def _upper_bound(a, lo, hi, x):
    """First index in [lo, hi) with a[i] > x, galloping from lo."""
    step = 1
    while lo + step < hi and a[lo + step - 1] <= x:
        lo += step
        step *= 2
    top = min(lo + step, hi)
    while lo < top:
        mid = (lo + top) // 2
        if a[mid] <= x:
            lo = mid + 1
        else:
            top = mid
    return lo


@njit(cache=True)
def next_group(a, i, n, b, j, m):
    """The window's next group of equal values starting at j, and where that
    value sits in the reference (searched from i): (j1, il, ir) such that
    b[j:j1] == a[il:ir] == b[j] and a[i:il] < b[j]."""
    x = b[j]
    j1 = j + 1
    while j1 < m and b[j1] == x:
        j1 += 1
    il = _lower_bound(a, i, n, x)
    return j1, il, _upper_bound(a, il, n, x)


@njit(parallel=True, cache=True)
def bincount_columns(codes, n_bins):
    """(features x n_bins) counts of integer codes; codes >= n_bins-1 land in
    the last bin (categories the reference never saw)."""
    rows, nf = codes.shape
    out = np.zeros((nf, n_bins), dtype=np.int64)
    for f in prange(nf):
        for r in range(rows):
            c = codes[r, f]
            if c >= n_bins - 1:
                c = n_bins - 1
            out[f, c] += 1
    return out


_PI2 = np.pi**2
_PI4 = np.pi**4
_PI6 = np.pi**6
_SQRT2PI = np.sqrt(2 * np.pi)
_SQRT3 = np.sqrt(3.0)
_MIN_LOG = np.log(np.finfo(np.float64).tiny)


@njit(cache=True)
def kolmogn_sf_pelz_good(n, x):
    """SF of the two-sided one-sample KS statistic by the Pelz-Good
    approximation, term for term as scipy.stats._ksstats._kolmogn_PelzGood
    (which SciPy uses for large n in the same region), so results agree to
    rounding."""
    z = np.sqrt(n) * x
    z2 = z * z
    z3 = z2 * z
    z4 = z2 * z2
    z6 = z4 * z2
    qlog = -_PI2 / 8 / z2
    if qlog < _MIN_LOG:
        return 1.0
    q = np.exp(qlog)
    k1a = -z2
    k1b = _PI2 / 4
    k2a = 6 * z6 + 2 * z4
    k2b = (2 * z4 - 5 * z2) * _PI2 / 4
    k2c = _PI4 * (1 - 2 * z2) / 16
    k3d = _PI6 * (5 - 30 * z2) / 64
    k3c = _PI4 * (-60 * z2 + 212 * z4) / 16
    k3b = _PI2 * (135 * z4 - 96 * z6) / 4
    k3a = -30 * z6 - 90 * z**8
    c0 = 0.0
    c1 = 0.0
    c2 = 0.0
    c3 = 0.0
    maxk = int(np.ceil(16 * z / np.pi))
    for k in range(maxk, 0, -1):
        m = 2 * k - 1
        m2 = m * m
        m4 = m2 * m2
        m6 = m4 * m2
        qp = q ** (8 * k)
        c0 = c0 * qp + 1.0
        c1 = c1 * qp + (k1a + k1b * m2)
        c2 = c2 * qp + (k2a + k2b * m2 + k2c * m4)
        c3 = c3 * qp + (k3a + k3b * m2 + k3c * m4 + k3d * m6)
    c0 = c0 * q * _SQRT2PI / z
    c1 = c1 * q * _SQRT2PI / (6 * z4)
    c2 = c2 * q * _SQRT2PI / (72 * z**7)
    c3 = c3 * q * _SQRT2PI / (6480 * z**10)
    q2 = np.exp(-_PI2 / 2 / z2)
    sqrt3z = _SQRT3 * z
    k2extra = 0.0
    k3extra = 0.0
    for k in range(maxk, 0, -1):
        ks2 = k * k
        qw = q2**ks2
        k2extra += ks2 * qw
        kspi = np.pi * k
        k3extra += (sqrt3z + kspi) * (sqrt3z - kspi) * ks2 * qw
    c2 += k2extra * _PI2 * _SQRT2PI / (-36 * z3)
    c3 += k3extra * _PI2 * _SQRT2PI / (216 * z6)
    c1 /= np.sqrt(n)
    c2 /= n
    c3 /= n * np.sqrt(n)
    # sf = 1 - cdf, with the cdf's terms negated as SciPy does
    return (1.0 - c0) - c1 - c2 - c3
