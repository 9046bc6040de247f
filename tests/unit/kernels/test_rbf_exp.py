"""The RBF kernels' vectorised exp() (kernels/drift/_rbf.py: Cody-Waite
reduction, a degree-13 polynomial, 2^k added to the exponent bits) against
np.exp over the whole range it serves, [-708, 0]."""

from __future__ import annotations

import numpy as np

from flywheel.kernels.drift._rbf import _exp_parts, _exp_scale


def _vector_exp(x: np.ndarray) -> np.ndarray:
    # x = -gamma * d2 with gamma 1, the dot product 0 and the row norm 0:
    # d2 = sq_b, so the kernel's exponent is exactly -sq_b
    sq_b = -x.astype(np.float64)
    p = np.empty_like(sq_b)
    kd = np.empty_like(sq_b)
    _exp_parts(np.zeros_like(sq_b), 0.0, sq_b, 1.0, p, kd)
    _exp_scale(p, kd)
    return p


def test_max_relative_error_against_numpy_over_the_served_range():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        np.linspace(-708.0, 0.0, 1_000_001),
        -rng.exponential(5.0, 200_000).clip(0, 708),  # dense near 0, where kernel values live
        np.array([0.0, -1e-300, -0.5 * np.log(2), -np.log(2), -700.0, -708.0]),
    ])
    got, want = _vector_exp(x), np.exp(x)
    rel = np.abs(got - want) / want
    assert rel.max() < 1e-15, f"max relative error {rel.max():.3g} at x = {x[rel.argmax()]!r}"
    assert got[x == 0.0].tolist() == [1.0] * int((x == 0.0).sum())


def test_arguments_below_the_range_are_clamped_not_wrapped():
    got = _vector_exp(np.array([-709.0, -1e4, -np.inf]))
    np.testing.assert_allclose(got, np.exp(-708.0), rtol=1e-15)
