"""The Numba kernel of the KS test (``ks.py``), in a module of its own so
that importing the test (a drift monitor's start) does not load Numba: the
kernel is loaded on the first window a Numba backend scores."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from flywheel.kernels._numba import guide_cell, guided_bounds, ks_series_p


@njit(parallel=True, cache=True)
def ks_stat(ref, ref_len, lo, scale, guide, win, win_len):
    """Two-sample KS statistic per feature, and its p-value where the series
    gives it (NaN where SciPy must: ``_numba.ks_series_p``), computed here on
    the kernel's threads rather than after them.

    The ECDF gap can only peak just before or at a window value, so only the
    window's distinct values are visited, in two passes. A value's position
    in the reference lies within its guide cell (``_numba.py``), one or two
    values wide, so the first pass bounds each gap from the cell's ends
    alone, above and below, without reading the reference; the second finds
    the exact position only where the upper bound passes the best gap known.
    The maximum is the same, to the bit (the bounds are the same float
    expressions at the cell's ends, and monotone); on 1,000 x 32 against
    10,000 rows a few dozen values are looked up instead of 32,000."""
    nf, width = win.shape
    out = np.empty(nf)
    p = np.empty(nf)
    cells = guide.shape[1] - 1
    upper_all = np.empty((nf, width))
    end_all = np.empty((nf, width), dtype=np.int64)
    for f in prange(nf):
        n = ref_len[f]
        m = win_len[f]
        a = ref[f]
        b = win[f]
        row = guide[f]
        inv_n = 1.0 / n
        inv_m = 1.0 / m
        upper = upper_all[f]
        end = end_all[f]
        floor = 0.0
        j = 0
        while j < m:
            x = b[j]
            j1 = j + 1
            while j1 < m and b[j1] == x:
                j1 += 1
            c = guide_cell(x, lo[f], scale[f], cells)
            left = row[c] * inv_n
            right = row[c + 1] * inv_n
            before = j * inv_m
            at = j1 * inv_m
            upper[j] = max(abs(left - before), abs(right - before), abs(left - at), abs(right - at))
            floor = max(floor, left - before, before - right, left - at, at - right)
            end[j] = j1
            j = j1
        d = floor  # no gap is smaller than its distance to its cell: D is at least this
        j = 0
        while j < m:
            j1 = end[j]
            if upper[j] > d:
                il, ir = guided_bounds(a, row, lo[f], scale[f], b[j])
                d = max(d, abs(il * inv_n - j * inv_m), abs(ir * inv_n - j1 * inv_m))
            j = j1
        out[f] = d
        p[f] = ks_series_p(np.float64(n), np.float64(m), d)
    return out, p
