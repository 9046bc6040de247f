import math

import numpy as np
import pytest

from flywheel.bench.harness import LatencyHistogram


def _filled(samples):
    h = LatencyHistogram()
    for s in samples:
        h.record(float(s))
    return h


@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 99.9, 100])
def test_percentiles_match_every_sample_within_precision(q):
    rng = np.random.default_rng(0)
    samples = np.concatenate([rng.lognormal(np.log(8e-4), 0.6, 20_000), rng.uniform(0.05, 0.2, 200)])
    h = _filled(samples)
    exact = np.percentile(samples, q, method="inverted_cdf")
    assert h.percentile(q) == pytest.approx(exact, rel=h.precision)
    assert h.count == len(samples)
    assert h.mean_s == pytest.approx(samples.mean(), rel=1e-9)


def test_merging_equals_one_histogram_of_all_samples():
    rng = np.random.default_rng(1)
    a, b = rng.exponential(1e-3, 5000), rng.exponential(5e-3, 3000)
    merged = _filled(a)
    merged.merge(_filled(b))
    whole = _filled(np.concatenate([a, b]))
    assert np.array_equal(merged.counts, whole.counts)
    assert merged.min_s == whole.min_s
    assert merged.max_s == whole.max_s
    for q in (50, 99):
        assert merged.percentile(q) == whole.percentile(q)


def test_round_trip_through_the_worker_wire_form():
    h = _filled([1e-4, 2e-3, 2e-3, 0.5, 2000.0])  # 2000 s lands in the last bucket
    back = LatencyHistogram.from_dict(h.to_dict())
    assert np.array_equal(back.counts, h.counts)
    assert (back.count, back.min_s, back.max_s) == (5, 1e-4, 2000.0)
    assert back.percentile(100) == 2000.0


def test_empty_histogram_reports_nan_and_round_trips():
    h = LatencyHistogram()
    assert math.isnan(h.percentile(50))
    assert math.isnan(h.mean_s)
    assert LatencyHistogram.from_dict(h.to_dict()).count == 0
    with pytest.raises(ValueError):
        h.percentile(101)
