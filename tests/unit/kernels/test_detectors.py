from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from flywheel.kernels import DriftDetector, WindowBuffer, benjamini_hochberg, bonferroni, gpu_available
from flywheel.protocol.errors import ConfigError, InvalidInputError

CPU = ["numpy", "numba"]


def _data(seed, n, m, f, shift=0.0, ties=False):
    rng = np.random.default_rng(seed)
    ref, win = rng.normal(size=(n, f)), rng.normal(shift, 1.0, size=(m, f))
    if ties:
        ref, win = np.round(ref, 1), np.round(win, 1)
    return ref, win


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("ties", [False, True])
def test_ks_matches_scipy_asymp(backend, ties):
    ref, win = _data(1, 3000, 700, 6, 0.05, ties)
    res = DriftDetector("ks", backend=backend).fit(ref).score(win)
    for f in range(6):
        want = stats.ks_2samp(ref[:, f], win[:, f], method="asymp")
        assert abs(res.statistic[f] - want.statistic) <= 1e-6
        assert abs(res.p_value[f] - want.pvalue) <= 1e-6


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("ties", [False, True])
def test_cvm_matches_scipy_asymptotic(backend, ties):
    ref, win = _data(2, 2000, 500, 5, 0.08, ties)
    res = DriftDetector("cvm", backend=backend).fit(ref).score(win)
    for f in range(5):
        want = stats.cramervonmises_2samp(ref[:, f], win[:, f], method="asymptotic")
        assert abs(res.statistic[f] - want.statistic) <= 1e-6
        assert abs(res.p_value[f] - want.pvalue) <= 1e-6


def test_chi2_and_psi_numba_equal_the_reference():
    rng = np.random.default_rng(3)
    ref, win = rng.integers(0, 8, size=(5000, 6)), rng.integers(0, 8, size=(1000, 6))
    win[:, 0] = 2  # one feature collapses onto one category
    win[:100, 1] = 8  # a category the reference never saw
    for test in ("chi2", "psi"):
        a = DriftDetector(test, backend="numpy").fit(ref).score(win)
        b = DriftDetector(test, backend="numba").fit(ref).score(win)
        np.testing.assert_allclose(b.statistic, a.statistic, rtol=1e-9, atol=1e-9)
        if test == "chi2":
            np.testing.assert_allclose(b.p_value, a.p_value, rtol=1e-9, atol=1e-300)
    psi = DriftDetector("psi", backend="numba").fit(ref).score(win)
    assert psi.drift[0]
    assert psi.drift[1]
    assert not any(psi.drift[2:])


def test_mmd_fast_path_matches_reference_and_is_seed_stable():
    ref, win = _data(4, 600, 150, 8, 0.15)
    a = DriftDetector("mmd", backend="numpy", n_permutations=200, seed=7).fit(ref).score(win)
    b = DriftDetector("mmd", backend="numba", n_permutations=200, seed=7).fit(ref).score(win)
    assert abs(b.statistic[0] - a.statistic[0]) <= 1e-5 * abs(a.statistic[0])
    # same permutations; float32 sums near the observed value are ties on both backends
    assert abs(b.p_value[0] - a.p_value[0]) <= 3 * np.sqrt(0.25 / 200)
    again = DriftDetector("mmd", backend="numba", n_permutations=200, seed=7).fit(ref).score(win)
    assert again == b


@pytest.mark.parametrize("n, m", [(2, 2), (3, 7), (7, 3), (5, 5), (37, 301), (301, 37)])
def test_mmd_fast_path_agrees_on_either_smaller_side_and_on_ties(n, m):
    # The Numba path gathers pair sums over the smaller permuted side (the
    # window when m <= n, else the reference) from float32 blocks; with small
    # samples many permutations reproduce the observed split exactly, and
    # those must count as ties on both backends, not flip with rounding.
    ref, win = _data(n + m, n, m, 4, 0.3)
    a = DriftDetector("mmd", backend="numpy", n_permutations=300, seed=1).fit(ref).score(win)
    b = DriftDetector("mmd", backend="numba", n_permutations=300, seed=1).fit(ref).score(win)
    assert abs(b.statistic[0] - a.statistic[0]) <= 1e-9 + 1e-5 * abs(a.statistic[0])
    assert b.p_value[0] == a.p_value[0]


def test_mmd_detects_a_shift_and_not_noise():
    ref, same = _data(5, 500, 200, 4)
    _, moved = _data(6, 500, 200, 4, shift=0.5)
    det = DriftDetector("mmd", backend="numba", n_permutations=100).fit(ref)
    assert det.score(moved).p_value[0] <= 0.01
    assert det.score(same).p_value[0] > 0.05
    assert DriftDetector("mmd", sigma=2.0, backend="numba").fit(ref).bandwidth == 2.0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 60), m=st.integers(2, 40), f=st.integers(1, 3),
    levels=st.sampled_from([0, 2, 5]), seed=st.integers(0, 10_000),
)
def test_property_numba_equals_scipy_for_any_sizes_ties_and_constant_columns(n, m, f, levels, seed):
    rng = np.random.default_rng(seed)
    ref, win = rng.normal(size=(n, f)), rng.normal(size=(m, f))
    if levels:  # heavy ties
        ref, win = rng.integers(0, levels, size=(n, f)).astype(float), rng.integers(0, levels, size=(m, f)).astype(float)
    ref[:, 0] = 1.0  # a constant column
    for test, fn, kw in (("ks", stats.ks_2samp, {"method": "asymp"}),
                         ("cvm", stats.cramervonmises_2samp, {"method": "asymptotic"})):
        res = DriftDetector(test, backend="numba").fit(ref).score(win)
        for j in range(f):
            want = fn(ref[:, j], win[:, j], **kw)
            assert abs(res.statistic[j] - want.statistic) <= 1e-6
            assert abs(res.p_value[j] - want.pvalue) <= 1e-6


@pytest.mark.parametrize("backend", CPU)
def test_nan_policy(backend):
    ref, win = _data(8, 300, 100, 3)
    win[5, 1] = np.nan
    with pytest.raises(InvalidInputError, match="NaN in feature 1"):
        DriftDetector("ks", backend=backend).fit(ref).score(win)
    res = DriftDetector("ks", backend=backend, nan_policy="omit").fit(ref).score(win)
    want = stats.ks_2samp(ref[:, 1], np.delete(win[:, 1], 5), method="asymp")
    assert abs(res.statistic[1] - want.statistic) <= 1e-12
    assert res.n_window == 100


def test_bad_inputs_and_settings_are_named():
    ref, win = _data(9, 50, 20, 3)
    with pytest.raises(InvalidInputError, match="window has 2 features; the reference has 3"):
        DriftDetector("ks", backend="numba").fit(ref).score(win[:, :2])
    with pytest.raises(InvalidInputError, match="categorical codes must be >= 0"):
        DriftDetector("chi2", backend="numba").fit(-np.ones((5, 1), int))
    with pytest.raises(ConfigError, match="test 'wat'"):
        DriftDetector("wat")
    with pytest.raises(ConfigError, match="backend 'tpu'"):
        DriftDetector("ks", backend="tpu")


def test_corrections():
    p = np.array([0.01, 0.04, 0.03, 0.2])
    np.testing.assert_allclose(bonferroni(p), [0.04, 0.16, 0.12, 0.8])
    np.testing.assert_allclose(benjamini_hochberg(p), [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])
    np.testing.assert_allclose(benjamini_hochberg(p), stats.false_discovery_control(p, method="bh"))


def test_windows_are_bounded_and_ordered():
    tumbling = WindowBuffer(4, 1)
    out = tumbling.add(np.arange(10.0))
    assert [w.ravel().tolist() for w in out] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    sliding = WindowBuffer(4, 1, mode="sliding", stride=2)
    out = sliding.add(np.arange(8.0))
    assert [w.ravel().tolist() for w in out] == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7]]


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU with CuPy on this machine")
def test_cupy_backend_matches_the_reference():  # pragma: no cover - runs on GPU machines
    ref, win = _data(10, 3000, 600, 6, 0.05, ties=True)
    for test in ("ks", "cvm"):
        a = DriftDetector(test, backend="numpy").fit(ref).score(win)
        b = DriftDetector(test, backend="cupy").fit(ref).score(win)
        np.testing.assert_allclose(b.statistic, a.statistic, atol=1e-6)
        np.testing.assert_allclose(b.p_value, a.p_value, atol=1e-6)


@pytest.mark.parametrize("n", [150, 300, 400, 1000, 9091, 50000])  # 300-400: the series' widest error (3e-7)
def test_fast_ks_pvalues_agree_with_scipy_kstwo(n):
    from flywheel.kernels.stats import ks_pvalues

    d = np.concatenate([np.linspace(1e-4, 0.3, 300), np.geomspace(1e-4, 0.3, 100)])
    got = ks_pvalues(d, float(2 * n), float(2 * n))  # round(n*m/(n+m)) = n
    np.testing.assert_allclose(got, stats.kstwo.sf(d, n), atol=1e-6, rtol=0)


@pytest.mark.parametrize("rows", [100, 20_000])  # one call below POOL_MIN_VALUES, the pool's chunks above
def test_the_window_sort_agrees_on_both_paths(rows):
    from flywheel.kernels.drift._sorted import POOL_MIN_VALUES, sort_columns, sort_pool

    win = np.random.default_rng(3).normal(size=(rows, 32))
    win[::7, 5] = np.nan
    assert (win.size >= POOL_MIN_VALUES) == (rows == 20_000)
    with sort_pool(2) as pool:
        cols = sort_columns(win, pool)
    np.testing.assert_array_equal(cols, np.sort(win.T, axis=1))


def test_tabulated_cvm_cdf_agrees_with_scipys_series_across_its_range():
    from scipy.stats._hypotests import _cdf_cvm_inf

    from flywheel.kernels.stats import CVM_TABLE_TOP, _cdf_cvm

    x = np.concatenate([np.geomspace(0.003, CVM_TABLE_TOP, 400), [CVM_TABLE_TOP + 0.5, 9.0]])  # the last two: series
    want = np.array([_cdf_cvm_inf(v) for v in x])
    np.testing.assert_allclose(_cdf_cvm(x), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", ["cauchy", "outlier", "window_beyond_reference", "tiny_span"])
def test_guided_kernels_match_scipy_where_the_guide_table_is_strained(case):
    """The sorted-column kernels find window values through a table of equal
    cells over the reference's central range: heavy tails, one huge value,
    a window entirely outside the reference and a span of a few ulps must
    all give SciPy's statistics."""
    rng = np.random.default_rng(11)
    ref, win = rng.standard_cauchy(size=(2000, 3)), rng.standard_cauchy(size=(300, 3))
    if case == "outlier":
        ref, win = rng.normal(size=(2000, 3)), rng.normal(size=(300, 3))
        ref[0], win[0] = 1e300, -1e300
    elif case == "window_beyond_reference":
        ref, win = rng.normal(size=(2000, 3)), rng.normal(50.0, 1.0, size=(300, 3))
        win[:150] = -win[:150]
    elif case == "tiny_span":
        ref = 1.0 + np.spacing(1.0) * rng.integers(0, 4, size=(2000, 3))
        win = 1.0 + np.spacing(1.0) * rng.integers(0, 6, size=(300, 3))
    for test, scipy_test, kw in (("ks", stats.ks_2samp, {"method": "asymp"}),
                                 ("cvm", stats.cramervonmises_2samp, {"method": "asymptotic"})):
        res = DriftDetector(test, backend="numba").fit(ref).score(win)
        for f in range(3):
            want = scipy_test(ref[:, f], win[:, f], **kw)
            assert abs(res.statistic[f] - want.statistic) <= 1e-6 * max(1.0, abs(want.statistic)), (test, f)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(200, 3000), m=st.integers(20, 600), shape=st.sampled_from(["normal", "lognormal", "spike"]),
       shift=st.sampled_from([0.0, 0.05, 0.5]), seed=st.integers(0, 10_000))
def test_property_ks_from_cell_bounds_is_scipys_statistic(n, m, shape, shift, seed):
    """The KS kernel looks up exact positions only where a cell's bounds
    could beat the best gap known; the statistic must not move."""
    rng = np.random.default_rng(seed)
    draw = {"normal": rng.normal, "lognormal": rng.lognormal, "spike": rng.normal}[shape]
    ref, win = draw(size=(n, 2)), draw(size=(m, 2)) + shift
    if shape == "spike":  # many values at one point, in both samples: crowded cells and ties
        ref[: n // 3, 0], win[: m // 4, 0] = 0.25, 0.25
    res = DriftDetector("ks", backend="numba").fit(ref).score(win)
    for j in range(2):
        assert res.statistic[j] == pytest.approx(stats.ks_2samp(ref[:, j], win[:, j]).statistic, abs=1e-12)


@pytest.mark.parametrize("backend", CPU)
def test_mmd_refit_on_another_reference_size_scores_as_a_fresh_detector(backend):
    rng = np.random.default_rng(8)
    small, large, win = rng.normal(size=(120, 3)), rng.normal(size=(300, 3)), rng.normal(0.3, 1.0, size=(60, 3))
    for first, second in ((small, large), (large, small)):
        det = DriftDetector("mmd", backend=backend, n_permutations=50)
        det.fit(first).score(win)  # permutations drawn for the first reference's size
        again = det.fit(second).score(win)
        fresh = DriftDetector("mmd", backend=backend, n_permutations=50).fit(second).score(win)
        assert again.p_value == fresh.p_value
        assert again.statistic == pytest.approx(fresh.statistic, rel=1e-12)
