"""The chi-square homogeneity test, per feature (categorical codes).

On the 2 x K table of category counts (reference, window), categories unseen
in both dropped, no continuity correction. Kernels, side by side: SciPy's
``chi2_contingency`` per feature (the reference); Numba and CuPy count the
codes (``CategoricalTest.counts``) and ``stats.chi2_from_counts`` scores every
feature at once from the counts.
"""

from __future__ import annotations

import numpy as np

from flywheel.kernels import stats as st
from flywheel.kernels.drift.base import CategoricalTest


class Chi2Test(CategoricalTest):
    """Chi-square on each categorical feature."""

    name = "chi2"

    def score_numpy(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from scipy.stats import chi2_contingency

        counts = self.counts(codes)
        stat, p = [], []
        for f in range(self.features):
            table = np.stack([self._ref_counts[f], counts[f]])
            table = table[:, table.sum(axis=0) > 0]
            if table.shape[1] < 2:
                stat.append(0.0)
                p.append(1.0)
                continue
            r = chi2_contingency(table, correction=False)
            stat.append(r.statistic)
            p.append(r.pvalue)
        return np.array(stat), np.array(p)

    def score_numba(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return st.chi2_from_counts(self._ref_counts, self.counts(codes))

    def score_cupy(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return st.chi2_from_counts(self._ref_counts, self.counts(codes))
