"""Mergeable latency histogram with bounded relative error (HDR-style).

Load generators in several processes each fill one; the parent adds them up
and reads percentiles from the merged counts. Percentiles therefore come from
every sample, not from averages of per-process percentiles. Buckets grow
geometrically by ``1 + precision`` from 1 microsecond to 1000 seconds, so a
reported percentile is within ``precision / 2`` (0.05 % by default) of the
true sample value; min, max and the mean are exact.
"""

from __future__ import annotations

import math

import numpy as np

_LOWEST_S = 1e-6
_HIGHEST_S = 1e3


class LatencyHistogram:
    __slots__ = ("precision", "_log_base", "counts", "count", "total_s", "min_s", "max_s")

    def __init__(self, precision: float = 1e-3) -> None:
        if not 0 < precision < 1:
            raise ValueError("precision must lie in (0, 1)")
        self.precision = precision
        self._log_base = math.log1p(precision)
        buckets = int(math.log(_HIGHEST_S / _LOWEST_S) / self._log_base) + 2
        self.counts = np.zeros(buckets, dtype=np.int64)
        self.count = 0
        self.total_s = 0.0
        self.min_s = math.inf
        self.max_s = 0.0

    def _index(self, seconds: float) -> int:
        if seconds <= _LOWEST_S:
            return 0
        return min(int(math.log(seconds / _LOWEST_S) / self._log_base) + 1, len(self.counts) - 1)

    def record(self, seconds: float) -> None:
        self.counts[self._index(seconds)] += 1
        self.count += 1
        self.total_s += seconds
        if seconds < self.min_s:
            self.min_s = seconds
        if seconds > self.max_s:
            self.max_s = seconds

    def merge(self, other: LatencyHistogram) -> None:
        if other.precision != self.precision:
            raise ValueError("cannot merge histograms of different precision")
        self.counts += other.counts
        self.count += other.count
        self.total_s += other.total_s
        self.min_s = min(self.min_s, other.min_s)
        self.max_s = max(self.max_s, other.max_s)

    def percentile(self, q: float) -> float:
        """The q-th percentile (0-100) in seconds; NaN when empty."""
        if not 0 <= q <= 100:
            raise ValueError("q must lie in [0, 100]")
        if self.count == 0:
            return math.nan
        # The rank numpy's "lower" interpolation uses, so that a histogram of
        # few samples reports one of them (within precision), not a blend.
        rank = max(1, math.ceil(q / 100 * self.count))
        idx = int(np.searchsorted(np.cumsum(self.counts), rank))
        if idx == 0:
            value = _LOWEST_S
        elif idx == len(self.counts) - 1:
            value = self.max_s  # the overflow bucket: beyond 1000 s, only max is known
        else:
            # geometric middle of the bucket [low, low * (1 + precision))
            value = _LOWEST_S * math.exp((idx - 1 + 0.5) * self._log_base)
        return min(max(value, self.min_s), self.max_s)

    @property
    def mean_s(self) -> float:
        return self.total_s / self.count if self.count else math.nan

    def to_dict(self) -> dict:
        """Sparse, JSON-friendly form (what worker processes send back)."""
        nz = np.flatnonzero(self.counts)
        return {
            "precision": self.precision,
            "index": nz.tolist(),
            "counts": self.counts[nz].tolist(),
            "total_s": self.total_s,
            "min_s": self.min_s if self.count else None,
            "max_s": self.max_s,
        }

    @classmethod
    def from_dict(cls, data: dict) -> LatencyHistogram:
        h = cls(data["precision"])
        h.counts[np.asarray(data["index"], dtype=np.int64)] = np.asarray(data["counts"], dtype=np.int64)
        h.count = int(h.counts.sum())
        h.total_s = float(data["total_s"])
        h.min_s = math.inf if data["min_s"] is None else float(data["min_s"])
        h.max_s = float(data["max_s"])
        return h
