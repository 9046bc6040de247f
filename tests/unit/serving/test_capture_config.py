"""CaptureConfig: validation names the field; an endpoint's capture reaches its models."""

from __future__ import annotations

import pytest

from flywheel.protocol.errors import ConfigError
from flywheel.serving.config import CaptureConfig, parse_config


def _deploy(model_capture=None, endpoint_capture=None) -> dict:
    model = {"name": "m", "path": "m.onnx"}
    if model_capture is not None:
        model["capture"] = model_capture
    cfg = {"models": [model, {"name": "m", "path": "m.onnx", "version": "2"}]}
    if endpoint_capture is not None:
        cfg["endpoints"] = [{"name": "m", "capture": endpoint_capture}]
    return cfg


def test_defaults():
    c = CaptureConfig(path="/data/cap")
    assert (c.sample, c.max_file_rows, c.max_queue_rows, c.flush_interval_s) == (0.1, 100_000, 10_000, 1.0)


@pytest.mark.parametrize("sample", [-0.1, 1.5])
def test_sample_out_of_range_names_field_and_range(sample):
    with pytest.raises(ConfigError, match=r"capture\.sample .* \[0, 1\]"):
        parse_config(_deploy({"path": "/c", "sample": sample}))


def test_path_required():
    with pytest.raises(ConfigError, match=r"capture\.path is required"):
        CaptureConfig(path="")


@pytest.mark.parametrize("field", ["max_file_rows", "max_file_bytes", "max_queue_rows"])
def test_sizes_positive(field):
    with pytest.raises(ConfigError, match=rf"capture\.{field} must be >= 1"):
        CaptureConfig(path="/c", **{field: 0})


def test_age_not_below_flush_interval():
    with pytest.raises(ConfigError, match=r"capture\.max_file_age_s"):
        CaptureConfig(path="/c", flush_interval_s=5, max_file_age_s=1)


def test_unknown_field_refused():
    with pytest.raises(ConfigError, match="bogus"):
        parse_config(_deploy({"path": "/c", "bogus": 1}))


def test_endpoint_capture_applies_to_models_without_their_own():
    cfg = parse_config(_deploy({"path": "/own", "sample": 1.0}, {"path": "/ep", "sample": 0.5}))
    assert [m.capture.path for m in cfg.models] == ["/own", "/ep"]


def test_no_capture_by_default():
    cfg = parse_config(_deploy())
    assert [m.capture for m in cfg.models] == [None, None]
