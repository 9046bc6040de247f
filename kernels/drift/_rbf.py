"""Gaussian (RBF) kernel blocks on the CPU, for the kernel-based drift tests.

K(a, b) = exp(-gamma |a_i - b_j|^2) in float32 with exact float64 row and
column sums, from a Numba kernel that computes the dot products itself and
an exp() that LLVM vectorizes. The mmd test (``drift/mmd.py``) keeps the
reference's block from fit and computes the window's blocks per score; a
later kernel test can reuse the same blocks.

Numba's on-disk cache only watches the file a cached function is defined in:
the helpers below are all called from this file, so editing them recompiles
their callers.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

# exp() is most of an RBF kernel's cost, and Numba's (libm's, one call per
# element) ran at ~10 ns here. _exp_parts/_exp_scale are exp(x) for x <= 0 in
# two loops LLVM vectorizes: Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2,
# a degree-13 Taylor polynomial for e^r (truncation < 2e-17 relative), then
# 2^k added straight into the exponent bits; k is read from the low bits of
# x*log2(e) + 1.5*2^52 (the shifter trick), so no float->int conversion is
# needed. Max relative error against np.exp: 2.2e-16. Arguments below -708
# are clamped (e^-708 = 3.3e-308: a kernel entry of zero for every purpose).
# No 'reassoc' in the fast-math flags here: it would fold the reduction.
# Inner loops index slices with the loop counter only: an index like lo + j
# could be negative to Numba, whose wraparound check then stops LLVM from
# vectorizing the loop.

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_SHIFTER = 6755399441055744.0  # 1.5 * 2**52
_SHIFTER_BITS = np.int64(np.float64(_SHIFTER).view(np.int64))
_C = [1.0 / math.factorial(k) for k in range(14)]
(_C0, _C1, _C2, _C3, _C4, _C5, _C6, _C7, _C8, _C9, _C10, _C11, _C12, _C13) = _C
_EXACT_FM = {"contract", "nsz", "arcp", "nnan", "ninf"}


@njit(fastmath=_EXACT_FM, cache=True)
def _exp_parts(gram, sq_i, sq_b, gamma, p, kd):
    """p[j] <- e^r and kd[j] <- the shifted k for x = -gamma * d2, the squared
    distance from the dot product gram[j] and the squared norms sq_i, sq_b[j]."""
    for j in range(p.shape[0]):
        d2 = sq_i + sq_b[j] - 2.0 * gram[j]
        x = -gamma * (d2 if d2 > 0.0 else 0.0)
        x = x if x > -708.0 else -708.0
        shifted = x * _LOG2E + _SHIFTER
        k = shifted - _SHIFTER
        r = x - k * _LN2_HI - k * _LN2_LO
        q = _C13 * r + _C12
        q = q * r + _C11
        q = q * r + _C10
        q = q * r + _C9
        q = q * r + _C8
        q = q * r + _C7
        q = q * r + _C6
        q = q * r + _C5
        q = q * r + _C4
        q = q * r + _C3
        q = q * r + _C2
        q = q * r + _C1
        p[j] = q * r + _C0
        kd[j] = shifted


@njit(cache=True)
def _exp_scale(p, kd):
    """p[j] *= 2^k by integer addition to the exponent field."""
    pbits = p.view(np.int64)
    kbits = kd.view(np.int64)
    for j in range(p.shape[0]):
        pbits[j] += (kbits[j] - _SHIFTER_BITS) << 52


@njit(fastmath=True, cache=True)
def _store_row(p, out_row, col_acc, skip_first):
    """out_row[j] <- float32(p[j]); col_acc[j] += p[j] (the first entry
    skipped when it is the diagonal); returns the float64 sum of p."""
    acc = 0.0
    for j in range(p.shape[0]):
        v = p[j]
        out_row[j] = v
        acc += v
    for j in range(skip_first, p.shape[0]):
        col_acc[j] += p[j]
    return acc


@njit(fastmath=True, cache=True)
def _dots4(a, i, b, lo, g):
    """g[r, j] <- a[i + r] . b[lo + j] for r < 4: four rows of the Gram
    matrix at once, so each row of b is loaded once for four products (3.7 ns
    per entry here with d = 32, against 12 ns one row at a time)."""
    a0, a1, a2, a3 = a[i], a[i + 1], a[i + 2], a[i + 3]
    g0, g1, g2, g3 = g[0], g[1], g[2], g[3]
    for j in range(g.shape[1]):
        bj = b[lo + j]
        s0 = s1 = s2 = s3 = 0.0
        for k in range(a0.shape[0]):
            x = bj[k]
            s0 += a0[k] * x
            s1 += a1[k] * x
            s2 += a2[k] * x
            s3 += a3[k] * x
        g0[j] = s0
        g1[j] = s1
        g2[j] = s2
        g3[j] = s3


_COLS = 256  # columns per step: the dot products and exp parts stay in L1


@njit(parallel=True, cache=True)
def rbf_rows(a, sq_a, rows, b, sq_b, gamma, upper, out32, row_sums, col_partial):
    """K(a, b) = exp(-gamma * |a_i - b_j|^2) for the first rows rows of a
    (a and sq_a are padded to a multiple of 4 rows), the dot products
    included (no BLAS: its worker threads spin after each call and took the
    cores from these loops). float32 entries go to out32 (for the permutation
    sums), float64 row sums to row_sums and column sums to col_partial (one
    row of partial sums per chunk of rows; the caller adds them up). With
    upper (b is a), only the upper triangle is computed and written, and
    column sums leave out the diagonal, so row_sums + column sums are the full
    matrix's row sums."""
    cols = b.shape[0]
    chunks = col_partial.shape[0]
    groups = (rows + 3) // 4
    row_sums[:rows] = 0.0
    for c in prange(chunks):
        g = np.empty((4, _COLS))
        p = np.empty(_COLS)
        kd = np.empty(_COLS)
        for grp in range(c, groups, chunks):  # interleaved: triangle rows differ in length
            i0 = 4 * grp
            for lo in range(i0 if upper else 0, cols, _COLS):
                hi = min(lo + _COLS, cols)
                _dots4(a, i0, b, lo, g[:, : hi - lo])
                for r in range(4):
                    i = i0 + r
                    if i >= rows:
                        break
                    first = max(i, lo) if upper else lo  # upper: from the row's own diagonal
                    if first >= hi:
                        continue
                    width = hi - first
                    _exp_parts(g[r, first - lo: hi - lo], sq_a[i], sq_b[first:hi], gamma, p[:width], kd[:width])
                    _exp_scale(p[:width], kd[:width])
                    row_sums[i] += _store_row(p[:width], out32[i][first:hi], col_partial[c][first:hi],
                                              1 if upper and first == i else 0)


def row_chunks() -> int:
    """Row chunks for the parallel kernels: two per Numba thread."""
    return 2 * numba.get_num_threads()


def rbf_block32(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray, gamma: float,
                symmetric: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K(a, b) as float32 with its float64 row and column sums. symmetric (b
    is a): only the upper triangle is computed and stored, and the sums are
    the full matrix's."""
    padded = -(-len(a) // 4) * 4  # the kernel computes four rows at a time
    a_pad = np.zeros((padded, a.shape[1]))
    a_pad[: len(a)] = a
    sq_pad = np.zeros(padded)
    sq_pad[: len(a)] = a_sq
    out = np.empty((len(a), len(b)), dtype=np.float32)
    rows = np.empty(len(a))
    cols = np.zeros((row_chunks(), len(b)))
    rbf_rows(a_pad, sq_pad, len(a), np.ascontiguousarray(b), b_sq, gamma, symmetric, out, rows, cols)
    col_sums = cols.sum(axis=0)
    if symmetric:
        rows += col_sums
        col_sums = rows
    return out, rows, col_sums

