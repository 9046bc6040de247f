"""Shadow traffic (serving/shadow.py): the config's checks and how a shadow
variant's answer is compared with the primary's."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flywheel.protocol.errors import ConfigError
from flywheel.serving.shadow import ShadowConfig, compare_outputs


def test_shadow_config_validates_fraction():
    assert ShadowConfig("2").fraction == 1.0
    for bad in (0.0, 1.5, math.nan):
        with pytest.raises(ConfigError, match=r"shadow.fraction .* \(0, 1\]"):
            ShadowConfig("2", fraction=bad)


def test_compare_outputs_cases():
    logits = np.array([[0.1, 0.9, 0.0], [0.7, 0.2, 0.1]], dtype=np.float32)
    same = compare_outputs({"y": logits}, {"y": logits.copy()})
    assert same == (True, 0.0)
    agree, diff = compare_outputs({"y": logits}, {"y": logits + 0.05})  # same argmax, other scores
    assert agree
    assert diff == pytest.approx(0.05, rel=1e-5)
    flipped = logits.copy()
    flipped[1] = [0.1, 0.2, 0.7]
    assert compare_outputs({"y": logits}, {"y": flipped})[0] is False
    reg = np.array([1.0, 2.0, 3.0])
    assert compare_outputs({"r": reg}, {"r": reg * (1 + 5e-4)})[0] is True
    assert compare_outputs({"r": reg}, {"r": reg + 0.1})[0] is False
    col = reg.reshape(3, 1)  # last dim 1: values, not class scores
    assert compare_outputs({"r": col}, {"r": col + 0.1})[0] is False
    nan = np.array([1.0, np.nan])
    assert compare_outputs({"r": nan}, {"r": nan.copy()}) == (True, 0.0)
    assert compare_outputs({"r": nan}, {"r": np.array([1.0, 2.0])}) == (False, math.inf)


def test_compare_outputs_non_float_and_mismatches():
    labels = np.array([1, 2, 3], dtype=np.int64)
    assert compare_outputs({"l": labels}, {"l": labels.copy()}) == (True, 0.0)
    assert compare_outputs({"l": labels}, {"l": np.array([1, 2, 4])}) == (False, 0.0)
    both = {"l": labels, "p": np.array([0.5, 0.25])}
    assert compare_outputs(both, {"l": labels, "p": np.array([0.5, 0.75])}) == (False, pytest.approx(0.25))
    assert compare_outputs({"a": labels}, {"b": labels}) == (False, math.inf)
    assert compare_outputs({"a": labels}, {"a": labels[:2]}) == (False, math.inf)
    assert compare_outputs({}, {}) == (True, 0.0)
