"""Maximum mean discrepancy with a Gaussian RBF kernel and a permutation test.

k(x, y) = exp(-||x - y||^2 / (2 sigma^2)). MMD^2 is the unbiased estimate
(diagonals excluded). sigma is given, or the median heuristic: the median
Euclidean distance between distinct rows of the *reference* (a seeded
subsample of at most 1,000 rows), fixed when the detector is fitted so that
the reference's kernel block can be computed once and kept.

Permutation test: P seeded permutations of the pooled rows; p-value
(1 + #{MMD^2_perm >= MMD^2_obs - tol}) / (1 + P), tol the float32 error bound
of the fast path (stats.permutation_pvalue). Every backend draws the same
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


# -- fast path (Numba) ------------------------------------------------------------
#
# Fit: the reference's kernel block K_XX, upper triangle only (it is
# symmetric), as float32 for the permutation sums, with float64 row sums for
# exact totals. Score: K_XY and the upper triangle of K_YY the same way, the
# observed MMD^2 from float64 sums, and each permutation from one number: the
# sum over pairs inside its smaller side (q = min(n, m) rows), gathered from
# the stored blocks (numba_kernels.perm_pair_sums). With the pooled row sums
# r and the total, that side's block sum S = 2 * pairs + q, its cross block
# sum C = sum(r over the side) - S, and the other block's sum total - S - 2C.
# That is P * q^2 / 2 gathers instead of a (n + m)^2 x P matrix product.


@dataclass
class MmdFit:
    ref: np.ndarray  # float64 (n, d)
    ref_sq: np.ndarray  # squared row norms
    gamma: float  # 1 / (2 sigma^2)
    kxx32: np.ndarray  # float32 (n, n), upper triangle (diagonal included) valid
    kxx_rows: np.ndarray  # float64 row sums of K_XX
    kxx_sum: float


def _chunks() -> int:
    import numba

    return 2 * numba.get_num_threads()


def rbf_block32(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray, gamma: float,
                symmetric: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K(a, b) as float32 with its float64 row and column sums. symmetric (b
    is a): only the upper triangle is computed and stored, and the sums are
    the full matrix's."""
    from flywheel.kernels.numba_kernels import rbf_rows

    padded = -(-len(a) // 4) * 4  # the kernel computes four rows at a time
    a_pad = np.zeros((padded, a.shape[1]))
    a_pad[: len(a)] = a
    sq_pad = np.zeros(padded)
    sq_pad[: len(a)] = a_sq
    out = np.empty((len(a), len(b)), dtype=np.float32)
    rows = np.empty(len(a))
    cols = np.zeros((_chunks(), len(b)))
    rbf_rows(a_pad, sq_pad, len(a), np.ascontiguousarray(b), b_sq, gamma, symmetric, out, rows, cols)
    col_sums = cols.sum(axis=0)
    if symmetric:
        rows += col_sums
        col_sums = rows
    return out, rows, col_sums


def mmd_fit_fast(ref: np.ndarray, sigma: float) -> MmdFit:
    ref = np.ascontiguousarray(ref, dtype=np.float64)
    sq = (ref * ref).sum(axis=1)
    gamma = 1.0 / (2 * sigma * sigma)
    kxx32, rows, _ = rbf_block32(ref, sq, ref, sq, gamma, symmetric=True)
    return MmdFit(ref, sq, gamma, kxx32, rows, float(rows.sum()))


def side_index(sides: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each pooled row, the permutations whose side holds it and its
    position there (CSR: row_ptr, row_perm, row_pos)."""
    q = sides.shape[1]
    flat = sides.ravel()
    order = np.argsort(flat, kind="stable")
    row_ptr = np.zeros(total + 1, dtype=np.int64)
    np.cumsum(np.bincount(flat, minlength=total), out=row_ptr[1:])
    return row_ptr, order // q, order % q


def mmd_score_fast(fit: MmdFit, win: np.ndarray, perms: np.ndarray) -> tuple[float, np.ndarray]:
    from flywheel.kernels.numba_kernels import perm_pair_sums

    win = np.ascontiguousarray(win, dtype=np.float64)
    n, m = len(fit.ref), len(win)
    win_sq = (win * win).sum(axis=1)
    kxy32, kxy_rows, kxy_cols = rbf_block32(fit.ref, fit.ref_sq, win, win_sq, fit.gamma)
    kyy32, kyy_rows, _ = rbf_block32(win, win_sq, win, win_sq, fit.gamma, symmetric=True)
    sxy, syy = float(kxy_rows.sum()), float(kyy_rows.sum())
    observed = mmd2_from_sums(fit.kxx_sum, syy, sxy, n, m)
    if not len(perms):
        return observed, np.empty(0)
    total = fit.kxx_sum + syy + 2 * sxy
    pooled_rows = np.concatenate([fit.kxx_rows + kxy_rows, kxy_cols + kyy_rows])
    window_side = m <= n  # gather over the smaller side
    sides = np.sort(perms[:, n:] if window_side else perms[:, :n], axis=1)
    q = sides.shape[1]
    split = (sides < n).sum(axis=1)
    pairs = perm_pair_sums(fit.kxx32, kxy32, kyy32, n, sides, split, *side_index(sides, n + m), _chunks())
    side_sum = 2.0 * pairs + q
    cross = pooled_rows[sides].sum(axis=1) - side_sum
    other = total - side_sum - 2.0 * cross
    a, b = (other, side_sum) if window_side else (side_sum, other)
    permuted = (a - n) / (n * (n - 1)) + (b - m) / (m * (m - 1)) - 2.0 * cross / (n * m)
    return observed, permuted
