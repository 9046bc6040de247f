"""P-values and multiple-testing corrections, shared by every backend.

P-value methods (chosen to match SciPy exactly, so backends differ only in how
fast they compute the statistic):

- KS: ``scipy.stats.ks_2samp(method="asymp")``: ``kstwo.sf(D, round(n*m/(n+m)))``.
- CvM: ``scipy.stats.cramervonmises_2samp(method="asymptotic")``: the
  statistic normalised by its exact mean and variance (Anderson 1962), then
  the limiting one-sample CvM distribution (Csörgő and Faraway 1996 series).
- chi-square: homogeneity test on the 2 x K table of category counts,
  categories unseen in both samples dropped, no continuity correction.
"""

from __future__ import annotations

import functools

import numpy as np

# scipy.stats costs ~0.4 s to import and only the slow corners below need it:
# it is imported where used, so a drift monitor's replica starts without it.


def ks_pvalues(d: np.ndarray, n: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``kstwo.sf(D, round(n*m/(n+m)))`` as SciPy's asymp method computes it.

    SciPy evaluates kstwo one value at a time in Python, and its exact
    Smirnov tail costs ~10 ms per value at n ~ 10^4. For large n (> 140, where
    SciPy itself switches to asymptotics) we evaluate the Pelz-Good series
    compiled with Numba for all features in one call, whose absolute error is
    O(n^-2) (< 4e-8 from n = 900), return 0 where the tail is below 2
    exp(-36) (Massart's bound), and defer to SciPy for small n, and for tiny
    D (its Durbin-matrix region, where p ~ 1; 0.1-1 ms a value there) below
    n = 300, where the series' error passes 4e-7. Agreement with SciPy is
    checked to 1e-6 by the tests."""
    from flywheel.kernels._numba import ks_series_pvalues

    d = np.ascontiguousarray(d, dtype=np.float64)
    n, m = (np.ascontiguousarray(np.broadcast_to(np.asarray(v, dtype=np.float64), d.shape)) for v in (n, m))
    out = ks_series_pvalues(d, n, m)
    rest = np.isnan(out)
    if rest.any():
        big, small = np.maximum(n[rest], m[rest]), np.minimum(n[rest], m[rest])
        from scipy import stats

        out[rest] = np.clip(stats.kstwo.sf(d[rest], np.round(big * small / (big + small))), 0, 1)
    return out


def cdf_cvm_series(x: np.ndarray) -> np.ndarray:
    """The limiting CvM distribution's CDF at each x (> 0), SciPy's series
    (``scipy.stats._hypotests._cdf_cvm_inf``) for all x at once: each x adds
    terms until its own term falls below 1e-7, that term included, as SciPy's
    loop does."""
    from scipy import special

    x = np.asarray(x, dtype=np.float64)
    total = np.zeros_like(x)
    active = np.ones(x.shape, dtype=bool)
    k = 0
    while active.any():
        xa = x[active]
        u = np.exp(special.gammaln(k + 0.5) - special.gammaln(k + 1)) / (np.pi**1.5 * np.sqrt(xa))
        y = 4 * k + 1
        q = y * y / (16 * xa)
        term = u * np.sqrt(y) * np.exp(-q) * special.kv(0.25, q)
        total[active] += term
        idx = np.flatnonzero(active)
        active[idx[np.abs(term) < 1e-7]] = False
        k += 1
    return total


# The series costs ~6 us a term in Python, about 0.2 ms for 32 features; the
# CDF is smooth, so it is tabulated once (60,000 points, 0.1 s the first time
# a CvM test scores) and read by cubic interpolation, within 1e-11 of the
# series (SciPy's own truncation is 1e-7); past CVM_TABLE_TOP, where 1 - CDF
# is below 1e-10, the series is summed as before.
CVM_TABLE_LOW, CVM_TABLE_TOP, CVM_TABLE_STEP = 0.003, 6.0, 1e-4


@functools.cache
def cvm_table() -> np.ndarray:
    count = int(round((CVM_TABLE_TOP - CVM_TABLE_LOW) / CVM_TABLE_STEP)) + 1
    return cdf_cvm_series(CVM_TABLE_LOW + CVM_TABLE_STEP * np.arange(count))


def _cdf_cvm(x: np.ndarray) -> np.ndarray:
    """The limiting CDF at each x >= CVM_TABLE_LOW: read from the table up to
    CVM_TABLE_TOP, the series past it."""
    from flywheel.kernels._numba import cvm_table_cdf

    x = np.ascontiguousarray(x, dtype=np.float64)
    out = cvm_table_cdf(x, cvm_table(), CVM_TABLE_LOW, CVM_TABLE_STEP, CVM_TABLE_TOP)
    far = np.isnan(out)
    if far.any():
        out[far] = cdf_cvm_series(x[far])
    return out


def cvm_pvalues(t: np.ndarray, nx: np.ndarray, ny: np.ndarray) -> np.ndarray:
    """SciPy's asymptotic p-value of each T statistic (``cramervonmises_2samp``):
    T normalised by its exact mean and variance, then 1 - the limiting CDF."""
    from flywheel.kernels._numba import cvm_table_pvalues

    t = np.ascontiguousarray(t, dtype=np.float64)
    a, b = (np.ascontiguousarray(np.broadcast_to(np.asarray(v, dtype=np.float64), t.shape)) for v in (nx, ny))
    p, tn = cvm_table_pvalues(t, a, b, cvm_table(), CVM_TABLE_LOW, CVM_TABLE_STEP, CVM_TABLE_TOP)
    far = np.isnan(p)
    if far.any():
        p[far] = np.maximum(0.0, 1.0 - cdf_cvm_series(tn[far]))
    return p


def cvm_statistic(u: np.ndarray, nx: np.ndarray, ny: np.ndarray) -> np.ndarray:
    """T from U (eq. 9 of Anderson 1962), as SciPy computes it."""
    k, big_n = nx * ny, nx + ny
    return u / (k * big_n) - (4 * k - 1) / (6 * big_n)


def chi2_from_counts(ref: np.ndarray, win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chi-square homogeneity statistic and p-value per feature from count
    tables (features x categories)."""
    ref, win = ref.astype(np.float64), win.astype(np.float64)
    rn, wn = ref.sum(axis=1, keepdims=True), win.sum(axis=1, keepdims=True)
    tot = ref + win
    keep = tot > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        er = np.where(keep, rn * tot / (rn + wn), 1.0)
        ew = np.where(keep, wn * tot / (rn + wn), 1.0)
        terms = np.where(keep, (ref - er) ** 2 / er + (win - ew) ** 2 / ew, 0.0)
    stat = terms.sum(axis=1)
    dof = keep.sum(axis=1) - 1
    from scipy import stats

    p = np.where(dof > 0, stats.chi2.sf(stat, np.maximum(dof, 1)), 1.0)
    return stat, p


PSI_EPS = 1e-4  # floor for empty bins, so that the log stays finite


def psi_from_counts(ref: np.ndarray, win: np.ndarray) -> np.ndarray:
    """Population stability index per feature: sum (w - r) * ln(w / r) over
    bin proportions, each floored at PSI_EPS."""
    pr = np.maximum(ref / ref.sum(axis=1, keepdims=True), PSI_EPS)
    pw = np.maximum(win / win.sum(axis=1, keepdims=True), PSI_EPS)
    return ((pw - pr) * np.log(pw / pr)).sum(axis=1)


def bonferroni(p: np.ndarray) -> np.ndarray:
    return np.minimum(1.0, np.asarray(p) * len(p))


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH step-up adjusted p-values (the false discovery rate at which each
    hypothesis would be rejected)."""
    p = np.ascontiguousarray(p, dtype=np.float64)
    if np.isnan(p).any():  # NaN ranks last and spreads to every adjusted value, as NumPy's minimum does
        return np.full(len(p), np.nan)
    from flywheel.kernels._numba import bh_adjusted

    return bh_adjusted(p)


# The corrections a detector may apply across features, by the name it is given.
CORRECTIONS = {"bh": benjamini_hochberg, "bonferroni": bonferroni, "none": np.asarray}


# The float32 error bound of a permuted MMD^2 on the Numba path: each kernel
# entry is rounded by at most 6e-8 (relative, entries in [0, 1]) and the
# statistic adds three block means, two with weight 1 and one with weight 2.
TIE_TOLERANCE = 4 * 6e-8


def permutation_pvalue(observed: float, permuted: np.ndarray) -> float:
    """(1 + #{permuted >= observed - TIE_TOLERANCE}) / (1 + P): never 0, valid
    at any P. Permuted statistics within the float32 error bound (2.4e-7) of
    the observed one count as ties: a permutation that reproduces the
    observed split, common with small samples, must count on every backend,
    not flip with the last bit (measured differences from the float64
    reference: <= 5e-8). Under the null the permuted MMD^2 spread is ~1e-4 at
    5,000 x 1,000 rows and shrinks about as 1/m, so the tolerance stays a
    small fraction of it unless windows hold ~10^5 rows or more."""
    return float((1 + np.count_nonzero(permuted >= observed - TIE_TOLERANCE)) / (1 + len(permuted)))
