"""Numba CPU kernels (``parallel=True`` over features or rows).

Imported only when the numba backend is used. Inputs are prepared by the
detector: per-feature sorted values as (features, rows) C-contiguous arrays
with NaNs sorted last and each feature's count of real values.
"""

from __future__ import annotations

import math

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
def _next_group(a, i, n, b, j, m):
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
def ks_stat(ref, ref_len, win, win_len):
    """Two-sample KS statistic per feature. The ECDF gap can only peak just
    before or at a window value, so we visit the window's distinct values and
    gallop through the (longer, fitted) reference: O(m log(n/m)) per feature."""
    nf = ref.shape[0]
    out = np.empty(nf)
    for f in prange(nf):
        n = ref_len[f]
        m = win_len[f]
        a = ref[f]
        b = win[f]
        i = 0
        j = 0
        d = 0.0
        while j < m:
            j1, il, ir = _next_group(a, i, n, b, j, m)
            before = abs(il / n - j / m)
            at = abs(ir / n - j1 / m)
            if before > d:
                d = before
            if at > d:
                d = at
            i = ir
            j = j1
        out[f] = d
    return out


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
def cvm_u(ref, ref_len, d1, d2, win, win_len):
    """U of the two-sample Cramér-von Mises test (pooled ranks, ties at
    their average rank). Window values are visited one by one; a stretch of
    reference values between two window values all sit j ranks above their own
    position (plus their in-reference tie offset), so its sum of squares comes
    from the prefix sums in O(1): O(m log(n/m)) per feature."""
    nf = ref.shape[0]
    out = np.empty(nf)
    for f in prange(nf):
        n = ref_len[f]
        m = win_len[f]
        a = ref[f]
        b = win[f]
        i = 0
        j = 0
        sx = 0.0
        sy = 0.0
        while j < m:
            j1, il, ir = _next_group(a, i, n, b, j, m)
            # reference stretch [i, il): each sits j ranks above its own rank
            cnt = il - i
            s1 = d1[f, il] - d1[f, i]
            s2 = d2[f, il] - d2[f, i]
            sx += cnt * j * j + 2.0 * j * s1 + s2
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
        s1 = d1[f, n] - d1[f, i]
        s2 = d2[f, n] - d2[f, i]
        sx += cnt * m * m + 2.0 * m * s1 + s2
        out[f] = n * sx + m * sy
    return out


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


# -- MMD: RBF blocks and permuted block sums ---------------------------------
#
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
                acc = 0.0
                if i < n:
                    row = kxx[i]
                    for k in range(start, sp):
                        acc += row[side[k]]
                    cross = kxy[i]
                    for k in range(max(start, sp), q):
                        acc += cross[side[k] - n]
                else:
                    row = kyy[i - n]
                    for k in range(start, q):
                        acc += row[side[k] - n]
                partial[c, perm] += acc
    out = np.zeros(count)
    for c in range(chunks):
        out += partial[c]
    return out
