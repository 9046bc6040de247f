"""Maximum mean discrepancy with a Gaussian RBF kernel and a permutation test.

k(x, y) = exp(-||x - y||^2 / (2 sigma^2)). MMD^2 is the unbiased estimate
(diagonals excluded). sigma is given, or the median heuristic: the median
Euclidean distance between distinct rows of the *reference* (a seeded
subsample of at most 1,000 rows), fixed when the detector is fitted so that
the reference's kernel block can be computed once and kept.

Permutation test: P seeded permutations of the pooled rows; p-value
(1 + #{MMD^2_perm >= MMD^2_obs}) / (1 + P). Every backend draws the same
permutations from the seed, so their p-values agree run to run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import cdist, pdist

MEDIAN_SUBSAMPLE = 1000


def median_bandwidth(ref: np.ndarray, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    rows = ref if len(ref) <= MEDIAN_SUBSAMPLE else ref[rng.choice(len(ref), MEDIAN_SUBSAMPLE, replace=False)]
    med = float(np.median(pdist(rows)))
    return med if med > 0 else 1.0


def permutations(n: int, m: int, count: int, seed: int) -> np.ndarray:
    """(count, n + m) permutations of the pooled indices; the first n of each
    row form the permuted 'reference' side."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n + m) for _ in range(count)]) if count else np.empty((0, n + m), int)


def mmd2_from_sums(sxx: float, syy: float, sxy: float, n: int, m: int) -> float:
    """Unbiased MMD^2 from kernel-block sums that include the diagonals (each
    diagonal entry of an RBF kernel is exactly 1)."""
    return (sxx - n) / (n * (n - 1)) + (syy - m) / (m * (m - 1)) - 2.0 * sxy / (n * m)


# -- reference (NumPy/SciPy) ---------------------------------------------------

def mmd_reference(ref: np.ndarray, win: np.ndarray, sigma: float, perms: np.ndarray) -> tuple[float, np.ndarray]:
    """The plain version: the pooled kernel matrix with SciPy in float64, and
    all permutations' block sums in one matrix product."""
    z = np.vstack([ref, win])
    k = np.exp(-cdist(z, z, "sqeuclidean") / (2 * sigma * sigma))
    n, m = len(ref), len(win)
    observed = mmd2_from_sums(k[:n, :n].sum(), k[n:, n:].sum(), k[:n, n:].sum(), n, m)
    if not len(perms):
        return observed, np.empty(0)
    s = np.zeros((n + m, len(perms)))
    s[perms[:, :n].T, np.arange(len(perms))[None, :]] = 1.0
    a = (s * (k @ s)).sum(axis=0)
    c = k.sum(axis=1) @ s - a
    b = k.sum() - a - 2 * c
    return observed, (a - n) / (n * (n - 1)) + (b - m) / (m * (m - 1)) - 2.0 * c / (n * m)


# -- fast path (BLAS + Numba; the CuPy backend mirrors it) ---------------------------

@dataclass
class MmdFit:
    ref: np.ndarray  # float64 (n, d)
    ref_sq: np.ndarray  # squared row norms
    gamma: float  # 1 / (2 sigma^2)
    kxx32: np.ndarray  # float32 (n, n) for the permutation products
    kxx_rows: np.ndarray  # float64 row sums of K_XX
    kxx_sum: float


_ROW_BLOCK = 512  # Gram rows per BLAS call: a reused buffer, no giant temporaries


def rbf_block32(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray, gamma: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """K(a, b) as float32 (for the permutation products) with its float64 row
    sums, computed block by block from the Gram matrix in one fused pass."""
    from flywheel.kernels.numba_kernels import rbf_from_gram

    out = np.empty((len(a), len(b)), dtype=np.float32)
    rows = np.empty(len(a))
    gram = np.empty((min(_ROW_BLOCK, len(a)), len(b)))
    for start in range(0, len(a), _ROW_BLOCK):
        stop = min(start + _ROW_BLOCK, len(a))
        g = gram[: stop - start]
        np.matmul(a[start:stop], b.T, out=g)
        rbf_from_gram(g, a_sq[start:stop], b_sq, gamma, out[start:stop], rows[start:stop])
    return out, rows


def mmd_fit_fast(ref: np.ndarray, sigma: float) -> MmdFit:
    ref = np.ascontiguousarray(ref, dtype=np.float64)
    sq = (ref * ref).sum(axis=1)
    gamma = 1.0 / (2 * sigma * sigma)
    kxx32, rows = rbf_block32(ref, sq, ref, sq, gamma)
    return MmdFit(ref, sq, gamma, kxx32, rows, float(rows.sum()))


def mmd_score_fast(fit: MmdFit, win: np.ndarray, perms: np.ndarray) -> tuple[float, np.ndarray]:
    from flywheel.kernels.numba_kernels import perm_quadratic_forms

    win = np.ascontiguousarray(win, dtype=np.float64)
    n, m = len(fit.ref), len(win)
    win_sq = (win * win).sum(axis=1)
    kxy32, kxy_rows = rbf_block32(fit.ref, fit.ref_sq, win, win_sq, fit.gamma)
    kyy32, kyy_rows = rbf_block32(win, win_sq, win, win_sq, fit.gamma)
    sxy, syy = float(kxy_rows.sum()), float(kyy_rows.sum())
    observed = mmd2_from_sums(fit.kxx_sum, syy, sxy, n, m)
    if not len(perms):
        return observed, np.empty(0)
    total = fit.kxx_sum + syy + 2 * sxy
    rows = np.concatenate([fit.kxx_rows + kxy_rows, kxy32.sum(axis=0, dtype=np.float64) + kyy_rows])
    # s[:, p] marks the rows that permutation p puts on the reference side.
    s = np.zeros((n + m, len(perms)), dtype=np.float32)
    s[perms[:, :n].T, np.arange(len(perms))[None, :]] = 1.0
    sx, sy = s[:n], s[n:]
    ks = np.vstack([fit.kxx32 @ sx + kxy32 @ sy, kxy32.T @ sx + kyy32 @ sy])  # K @ s, block by block
    a = perm_quadratic_forms(ks, s)  # s' K s: the permuted reference block's sum
    c = rows @ s.astype(np.float64) - a  # cross block
    b = total - a - 2 * c
    permuted = (a - n) / (n * (n - 1)) + (b - m) / (m * (m - 1)) - 2.0 * c / (n * m)
    return observed, permuted
