"""The population stability index, per feature (categorical codes).

PSI = sum (w - r) ln(w / r) over the category proportions of the window (w)
and the reference (r), each floored at ``stats.PSI_EPS``. It has no p-value
(reported as NaN) and no multiple-testing correction: a feature drifts when
its index exceeds ``threshold`` (0.2 by default, the usual "significant
shift"). Every backend computes the index from counts with
``stats.psi_from_counts``; they differ only in how they count the codes
(``CategoricalTest.counts``: NumPy's bincount, a Numba or a CuPy kernel).
"""

from __future__ import annotations

import msgspec
import numpy as np

from flywheel.kernels import stats as st
from flywheel.kernels.drift.base import CategoricalTest, Scores
from flywheel.protocol.errors import ConfigError


class PSITest(CategoricalTest):
    """Population stability index on each categorical feature."""

    name = "psi"

    class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        """threshold: a feature drifts when its index exceeds it."""

        threshold: float = 0.2

        def __post_init__(self) -> None:
            if not self.threshold > 0:
                raise ConfigError(f"threshold {self.threshold} must be > 0")

    def _index(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return st.psi_from_counts(self._ref_counts, self.counts(codes)), np.full(self.features, np.nan)

    def score_numpy(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._index(codes)

    def score_numba(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._index(codes)

    def score_cupy(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._index(codes)

    def verdict(self, scores: Scores, correction: str, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """A threshold instead of a test: p-values stay NaN, uncorrected."""
        return scores.p_value, scores.statistic > self.params.threshold
