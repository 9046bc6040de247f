"""The Numba kernels of the CvM test (``cvm.py``), in a module of their own
so that importing the test does not load Numba: they are loaded on the first
window a Numba backend scores."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from flywheel.kernels._numba import cvm_table_p, next_group


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
def cvm_stat(ref, ref_len, lo, scale, guide, d1, d2, tied, win, win_len, table, low, step, top):
    """The two-sample Cramér-von Mises statistic T per feature (pooled
    ranks, ties at their average rank), its p-value where the tabulated CDF
    reaches (NaN past ``top``: ``_numba.cvm_table_p``) and the normalised
    statistic. Window values are visited one by one, each found in the
    reference through its guide table (``_numba.py``); a stretch of
    reference values between two window values all sit j ranks above their
    own position (plus their in-reference tie offset), so its sum of squares
    comes from the prefix sums in O(1); a feature whose reference has no ties
    (``tied`` false) has no offsets, and its prefix sums are not read."""
    nf = ref.shape[0]
    out = np.empty(nf)
    p = np.empty(nf)
    tn = np.empty(nf)
    for f in prange(nf):
        n = ref_len[f]
        m = win_len[f]
        a = ref[f]
        b = win[f]
        row = guide[f]
        offsets = tied[f]
        i = 0
        j = 0
        sx = 0.0
        sy = 0.0
        while j < m:
            j1, il, ir = next_group(a, row, lo[f], scale[f], b, j, m)
            # reference stretch [i, il): each sits j ranks above its own rank
            cnt = il - i
            sx += cnt * j * j
            if offsets:
                sx += 2.0 * j * (d1[f, il] - d1[f, i]) + (d2[f, il] - d2[f, i])
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
        sx += cnt * m * m
        if offsets:
            sx += 2.0 * m * (d1[f, n] - d1[f, i]) + (d2[f, n] - d2[f, i])
        # T from U (eq. 9 of Anderson 1962, as stats.cvm_statistic), then its
        # p-value from the table where it reaches (NaN past it)
        nx = np.float64(n)
        ny = np.float64(m)
        k = nx * ny
        big_n = nx + ny
        t = (n * sx + m * sy) / (k * big_n) - (4 * k - 1) / (6 * big_n)
        out[f] = t
        p[f], tn[f] = cvm_table_p(t, nx, ny, table, low, step, top)
    return out, p, tn
