"""The drift-test registry: every test is an object found by name, and a new
test is one class plus its registration."""

from __future__ import annotations

import importlib.metadata

import msgspec
import numpy as np
import pytest

from flywheel.kernels import (
    TESTS,
    DriftDetector,
    DriftTest,
    available_tests,
    get_test,
    register_test,
    unregister_test,
)
from flywheel.kernels.drift import ContinuousTest, registry
from flywheel.kernels.drift.base import KERNEL_BACKENDS, KINDS
from flywheel.protocol.errors import AlreadyExistsError, ConfigError, InvalidInputError

BUILTIN = ("ks", "cvm", "chi2", "psi", "mmd")


class MeanGap(ContinuousTest):
    """A toy test: the absolute difference of the means, per feature, with a
    made-up p-value (0 past a gap of 0.5, else 1); NumPy only."""

    name = "toy_mean_gap"
    backends = ("numpy",)

    def fit_data(self, data: np.ndarray) -> None:
        self._mean = data.mean(axis=0)

    def score_numpy(self, win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gap = np.abs(win.mean(axis=0) - self._mean)
        return gap, np.where(gap > 0.5, 0.0, 1.0)


class FromEntryPoint(MeanGap):
    name = "toy_from_entry_point"


@pytest.fixture
def toy():
    register_test(MeanGap)
    yield MeanGap
    unregister_test(MeanGap.name)


def _case(kind: str, seed: int = 11):
    rng = np.random.default_rng(seed)
    if kind == "categorical":
        ref, win = rng.integers(0, 6, size=(2000, 4)), rng.integers(0, 6, size=(500, 4))
        win[:200, 2] = 1  # one feature leans onto one category
        return ref, win
    ref, win = rng.normal(size=(400, 4)), rng.normal(size=(150, 4))
    win[:, 1] += 0.6
    return ref, win


def test_the_registry_lists_the_five_builtin_tests_first():
    assert available_tests()[:5] == BUILTIN
    assert TESTS == BUILTIN


@pytest.mark.parametrize("name", BUILTIN)
def test_each_builtin_test_is_a_class_with_the_common_interface(name):
    cls = get_test(name)
    assert issubclass(cls, DriftTest)
    assert cls.name == name
    assert cls.kind in KINDS
    assert cls.backends == KERNEL_BACKENDS


def test_kinds_and_joint_scoring_are_declared_by_the_tests():
    assert [get_test(t).kind for t in BUILTIN] == ["continuous", "continuous", "categorical", "categorical",
                                                   "continuous"]
    assert [t for t in BUILTIN if get_test(t).joint] == ["mmd"]


@pytest.mark.parametrize("name", available_tests())
def test_numba_and_numpy_agree_for_every_registered_test(name):
    ref, win = _case(get_test(name).kind)
    params = {"n_permutations": 100, "seed": 2} if name == "mmd" else {}
    a = DriftDetector(name, backend="numpy", **params).fit(ref).score(win)
    b = DriftDetector(name, backend="numba", **params).fit(ref).score(win)
    # mmd's fast path sums float32 kernel blocks; the others agree to rounding
    rtol = 1e-5 if name == "mmd" else 1e-9
    np.testing.assert_allclose(b.statistic, a.statistic, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(b.p_value, a.p_value, rtol=1e-9, atol=1e-12)
    assert b.drift == a.drift
    assert (b.n_reference, b.n_window) == (a.n_reference, a.n_window)
    assert any(a.drift)  # the case really moved


def test_an_unknown_test_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"test 'wat' must be one of \('ks', 'cvm', 'chi2', 'psi', 'mmd'"):
        get_test("wat")


def test_a_registered_test_runs_in_the_detector(toy):
    assert available_tests()[-1] == "toy_mean_gap"
    assert get_test("toy_mean_gap") is toy
    rng = np.random.default_rng(0)
    det = DriftDetector("toy_mean_gap", correction="none", alpha=0.5).fit(rng.normal(size=(500, 2)))
    assert det.backend == "numpy"  # auto: the only backend it has
    res = det.score(np.column_stack([rng.normal(size=200), rng.normal(1.0, 1.0, size=200)]))
    assert res.drift == [False, True]
    assert res.test == "toy_mean_gap"


def test_a_backend_the_test_lacks_is_refused_naming_it(toy):
    with pytest.raises(ConfigError, match="test 'toy_mean_gap' has no 'numba' backend"):
        DriftDetector("toy_mean_gap", backend="numba")


def test_registration_refuses_a_taken_name_and_classes_that_do_not_fit():
    with pytest.raises(AlreadyExistsError, match="'ks' is already registered"):
        register_test(type("Again", (MeanGap,), {"name": "ks"}))
    with pytest.raises(ConfigError, match="drift test name 'Bad Name'"):
        register_test(type("Bad", (MeanGap,), {"name": "Bad Name"}))
    with pytest.raises(ConfigError, match="not a DriftTest subclass"):
        register_test(type("Plain", (), {"name": "plain"}))
    with pytest.raises(ConfigError, match="each with a score_<backend> method"):
        register_test(type("NoNumba", (MeanGap,), {"name": "no_numba", "backends": ("numpy", "numba")}))
    assert "no_numba" not in available_tests()


def test_a_test_from_an_entry_point_is_listed_and_loaded(monkeypatch):
    ep = importlib.metadata.EntryPoint(
        name=FromEntryPoint.name, value=f"{__name__}:FromEntryPoint", group=registry.ENTRY_POINT_GROUP
    )
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [ep] if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_entry_points", None)  # look again
    assert FromEntryPoint.name in available_tests()
    assert get_test(FromEntryPoint.name) is FromEntryPoint


@pytest.mark.parametrize("name", ["chi2", "psi"])
def test_categorical_tests_name_the_input_that_is_not_integer_codes(name):
    ref, win = _case("categorical")
    with pytest.raises(InvalidInputError, match="reference: categorical codes must be integers"):
        DriftDetector(name, backend="numba").fit(ref + 0.5)
    det = DriftDetector(name, backend="numba").fit(ref.astype(np.float64))  # integral floats are codes
    with pytest.raises(InvalidInputError, match="window: categorical codes must be integers"):
        det.score(win + 0.25)


def test_a_parameter_the_test_does_not_have_is_refused_naming_the_test():
    with pytest.raises(ConfigError, match=r"test 'ks' takes no parameters \(got n_permutations\)"):
        DriftDetector("ks", n_permutations=10)
    with pytest.raises(ConfigError, match=r"parameters of test 'mmd': Object contains unknown field `sgima`"):
        DriftDetector("mmd", sgima=1.0)


def test_a_parameter_out_of_range_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"parameters of test 'mmd': sigma must be > 0"):
        DriftDetector("mmd", sigma=0.0)
    with pytest.raises(ConfigError, match=r"parameters of test 'psi': threshold -1.0 must be > 0"):
        DriftDetector("psi", threshold=-1.0)


def test_a_test_declares_its_own_parameters_in_its_one_file():
    class Shifted(ContinuousTest):
        name = "shifted_toy"
        backends = ("numpy",)

        class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
            offset: float = 0.0

        def fit_data(self, data):
            pass

        def score_numpy(self, win):
            stat = np.full(win.shape[1], self.params.offset)
            return stat, np.ones(win.shape[1])

    register_test(Shifted)
    try:
        det = DriftDetector("shifted_toy", backend="numpy", offset=2.5).fit(np.zeros((10, 2)))
        assert list(det.score(np.zeros((5, 2))).statistic) == [2.5, 2.5]
    finally:
        unregister_test("shifted_toy")


def test_psi_threshold_is_a_parameter_of_psi():
    ref = np.repeat(np.arange(4), 50).reshape(-1, 1)
    win = np.repeat([0, 0, 1, 3], 25).reshape(-1, 1)
    index = DriftDetector("psi", backend="numpy").fit(ref).score(win).statistic[0]
    assert DriftDetector("psi", backend="numpy", threshold=index * 2).fit(ref).score(win).drift == [False]
    assert DriftDetector("psi", backend="numpy", threshold=index / 2).fit(ref).score(win).drift == [True]
