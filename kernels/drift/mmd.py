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

Kernels, side by side: the NumPy/SciPy reference (the pooled kernel matrix in
float64, all permutations in one matrix product), the Numba fast path (the
reference's kernel block kept from fit, float32 blocks from ``_rbf.py``,
permutations from pair sums gathered over the smaller side) and CuPy (the
pooled matrix by cuBLAS, permutations as one matrix product on the GPU).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import msgspec
import numpy as np
from numba import njit, prange
from scipy.spatial.distance import cdist, pdist

from flywheel.kernels import stats as st
from flywheel.kernels.drift._rbf import rbf_block32, row_chunks
from flywheel.kernels.drift.base import ContinuousTest
from flywheel.protocol.errors import ConfigError, InvalidInputError

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
# the stored blocks (perm_pair_sums below). With the pooled row sums
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


def mmd_fit_fast(ref: np.ndarray, sigma: float) -> MmdFit:
    ref = np.ascontiguousarray(ref, dtype=np.float64)
    sq = (ref * ref).sum(axis=1)
    gamma = 1.0 / (2 * sigma * sigma)
    kxx32, rows, _ = rbf_block32(ref, sq, ref, sq, gamma, symmetric=True)
    return MmdFit(ref, sq, gamma, kxx32, rows, float(rows.sum()))


class PermPlan(NamedTuple):
    """What the permutations' pair sums need, fixed by (n, m, the
    permutations): each one's sorted indices on the smaller side (int32),
    how many of them are reference rows, and for each pooled row the
    permutations whose side holds it and its position there (CSR: row_ptr,
    row_perm, row_pos). It depends on the window's size only, so a detector
    keeps it between windows of one size (2 ms of 100 permutations' setup
    at 1,000 x 500, a fifth of a score)."""

    window_side: bool
    sides: np.ndarray
    split: np.ndarray
    row_ptr: np.ndarray
    row_perm: np.ndarray
    row_pos: np.ndarray


def perm_plan(n: int, m: int, perms: np.ndarray) -> PermPlan:
    window_side = m <= n  # gather over the smaller side
    sides = np.sort(perms[:, n:] if window_side else perms[:, :n], axis=1).astype(np.int32)
    q = sides.shape[1]
    flat = sides.ravel()
    order = np.argsort(flat, kind="stable")
    row_ptr = np.zeros(n + m + 1, dtype=np.int64)
    np.cumsum(np.bincount(flat, minlength=n + m), out=row_ptr[1:])
    return PermPlan(window_side, sides, (sides < n).sum(axis=1), row_ptr, order // q, order % q)


def mmd_score_fast(fit: MmdFit, win: np.ndarray, perms: np.ndarray,
                   plan: PermPlan | None = None) -> tuple[float, np.ndarray]:
    win = np.ascontiguousarray(win, dtype=np.float64)
    n, m = len(fit.ref), len(win)
    win_sq = (win * win).sum(axis=1)
    kxy32, kxy_rows, kxy_cols = rbf_block32(fit.ref, fit.ref_sq, win, win_sq, fit.gamma)
    kyy32, kyy_rows, _ = rbf_block32(win, win_sq, win, win_sq, fit.gamma, symmetric=True)
    sxy, syy = float(kxy_rows.sum()), float(kyy_rows.sum())
    observed = mmd2_from_sums(fit.kxx_sum, syy, sxy, n, m)
    if not len(perms):
        return observed, np.empty(0)
    plan = plan if plan is not None else perm_plan(n, m, perms)
    total = fit.kxx_sum + syy + 2 * sxy
    pooled_rows = np.concatenate([fit.kxx_rows + kxy_rows, kxy_cols + kyy_rows])
    q = plan.sides.shape[1]
    pairs = perm_pair_sums(fit.kxx32, kxy32, kyy32, n, plan.sides, plan.split, plan.row_ptr, plan.row_perm,
                           plan.row_pos, row_chunks())
    side_sum = 2.0 * pairs + q
    cross = pooled_rows[plan.sides].sum(axis=1) - side_sum
    other = total - side_sum - 2.0 * cross
    a, b = (other, side_sum) if plan.window_side else (side_sum, other)
    permuted = (a - n) / (n * (n - 1)) + (b - m) / (m * (m - 1)) - 2.0 * cross / (n * m)
    return observed, permuted


@njit(fastmath=True, inline="always")
def _gather_sum(row, idx, offset):
    """sum(row[idx - offset]) in float64. The index is made unsigned: a
    signed one gets Numba's negative-index wraparound on every read, which
    kept LLVM from vectorizing the gather (6.0 -> 3.8 ms for 100
    permutations at 1,000 x 500). The float32 entries add up exactly in
    float64 at these counts, so the order LLVM chooses changes nothing."""
    acc = 0.0
    for k in range(idx.shape[0]):
        acc += row[np.uint64(idx[k] - offset)]
    return acc


@njit(parallel=True, cache=True)
def perm_pair_sums(kxx, kxy, kyy, n, sides, split, row_ptr, row_perm, row_pos, chunks):
    """For every permutation p, the sum of K over pairs i < j of sides[p] (its
    sorted pooled indices of one side; split[p] of them are < n), read from
    the upper triangles of kxx and kyy and from kxy. Row by row over the pooled
    matrix: each row is read once from memory and serves every permutation it
    belongs to (row_perm/row_pos[row_ptr[i]:row_ptr[i + 1]]: those
    permutations and i's position in them), so the permutations cost gathers
    from cache, not 100 passes over the matrix."""
    count, q = sides.shape
    total = n + kyy.shape[0]
    partial = np.zeros((chunks, count))
    for c in prange(chunks):
        for i in range(c, total, chunks):
            for e in range(row_ptr[i], row_ptr[i + 1]):
                perm = row_perm[e]
                side = sides[perm]
                start = row_pos[e] + 1
                sp = split[perm]
                if i < n:
                    acc = _gather_sum(kxx[i], side[start:sp], 0) if start < sp else 0.0
                    acc += _gather_sum(kxy[i], side[max(start, sp):], n)
                else:
                    acc = _gather_sum(kyy[i - n], side[start:], n)
                partial[c, perm] += acc
    out = np.zeros(count)
    for c in range(chunks):
        out += partial[c]
    return out


# -- CuPy --------------------------------------------------------------------------


@functools.cache
def _rbf_cupy():
    from flywheel.kernels._cupy import cp

    return cp.ElementwiseKernel(
        "float64 d2, float64 gamma", "float64 k", "k = exp(-gamma * (d2 > 0 ? d2 : 0))", "fw_rbf"
    )


def mmd_score_cupy(ref: np.ndarray, win: np.ndarray, gamma: float, perms: np.ndarray) -> tuple[float, np.ndarray]:
    """The permutation test on the GPU: pooled RBF matrix by cuBLAS + one
    elementwise kernel, permuted block sums as one matrix product."""
    from flywheel.kernels._cupy import cp

    n, m = len(ref), len(win)
    z = cp.asarray(np.vstack([ref, win]), dtype=cp.float64)
    sq = (z * z).sum(axis=1)
    k = _rbf_cupy()(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), gamma)
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


class MMDTest(ContinuousTest):
    """MMD^2 over all features jointly, with a permutation p-value; rows
    holding a NaN are dropped (under nan_policy omit); the reference and the
    window each need two rows."""

    name = "mmd"
    joint: ClassVar[bool] = True

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        """sigma: the RBF bandwidth (None: the median heuristic on the
        reference); n_permutations: permutations for the p-value (0: none,
        the p-value is NaN); seed: of the permutations and the heuristic."""

        sigma: float | None = None
        n_permutations: int = 100
        seed: int = 0

        def __post_init__(self) -> None:
            if self.n_permutations < 0:
                raise ConfigError("n_permutations must be >= 0")
            if self.sigma is not None and self.sigma <= 0:
                raise ConfigError("sigma must be > 0")
    bandwidth: float | None = None  # sigma, given or fixed at fit

    def fit_data(self, data: np.ndarray) -> None:
        ref = data[~np.isnan(data).any(axis=1)]
        if len(ref) < 2:
            raise InvalidInputError("mmd needs at least 2 reference rows without NaN")
        self.bandwidth = self.params.sigma or median_bandwidth(ref, self.params.seed)
        self._ref = ref
        self.n_reference = len(ref)
        self._kept = None  # permutations drawn for the previous reference's size
        if self.backend == "numba":
            self._fit = mmd_fit_fast(ref, self.bandwidth)

    def _rows(self, win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The window's rows without NaN and the seeded permutations."""
        win = win[~np.isnan(win).any(axis=1)]
        if len(win) < 2:
            raise InvalidInputError("mmd needs at least 2 window rows without NaN")
        return win, self._permutations(len(win))[0]

    def _permutations(self, m: int) -> tuple[np.ndarray, PermPlan | None]:
        """The seeded permutations for a window of m rows (and the numba
        backend's plan of them), kept for the last (reference, window) size:
        they depend on the sizes only, and drawing them took a sixth of a
        score. A refit clears them."""
        n = len(self._ref)
        kept = self._kept  # one tuple, swapped whole: safe under concurrent scores
        if kept is None or kept[0] != (n, m):
            perms = permutations(n, m, self.params.n_permutations, self.params.seed)
            plan = perm_plan(n, m, perms) if self.backend == "numba" and len(perms) else None
            kept = self._kept = ((n, m), perms, plan)
        return kept[1], kept[2]

    @staticmethod
    def _result(observed: float, permuted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = st.permutation_pvalue(observed, permuted) if len(permuted) else float("nan")
        return np.array([observed]), np.array([p])

    def score_numpy(self, win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        win, perms = self._rows(win)
        return self._result(*mmd_reference(self._ref, win, self.bandwidth, perms))

    def score_numba(self, win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        win, _ = self._rows(win)
        return self._result(*mmd_score_fast(self._fit, win, *self._permutations(len(win))))

    def score_cupy(self, win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        win, perms = self._rows(win)
        return self._result(*mmd_score_cupy(self._ref, win, 1.0 / (2 * self.bandwidth**2), perms))
