"""``server.tracing`` and ``server.access_log``: validated, errors name the field."""

from __future__ import annotations

import pytest

from flywheel.protocol.errors import ConfigError
from flywheel.serving import parse_config


def _server(**server):
    return parse_config({"name": "t", "server": server, "models": []}).server


def test_both_are_off_by_default():
    server = _server()
    assert server.tracing is None
    assert server.access_log.sample == 0.0


def test_tracing_from_yaml_fields():
    t = _server(tracing={"otlp_endpoint": "http://127.0.0.1:4318/v1/traces", "sample_ratio": 0.25}).tracing
    assert (t.enabled, t.sample_ratio, t.service_name) == (True, 0.25, "flywheel")


def test_an_empty_endpoint_is_off():
    assert _server(tracing={}).tracing.enabled is False


@pytest.mark.parametrize("tracing, field", [
    ({"sample_ratio": 1.5}, "server.tracing.sample_ratio"),
    ({"otlp_endpoint": "127.0.0.1:4318"}, "server.tracing.otlp_endpoint"),
    ({"service_name": ""}, "server.tracing.service_name"),
])
def test_bad_tracing_names_the_field(tracing, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _server(tracing=tracing)


def test_bad_access_log_sample_names_the_field():
    with pytest.raises(ConfigError, match=r"server\.access_log\.sample"):
        _server(access_log={"sample": -0.1})
