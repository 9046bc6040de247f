"""server.autoscaling: its checks, the policy Serve calls with the replicas'
in-flight counts, and the autoscaling config handed to Serve."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from flywheel.protocol.errors import ConfigError
from flywheel.serving import parse_config
from flywheel.serving._private.autoscaling import (
    IN_FLIGHT,
    POLICY,
    desired_replicas,
    in_flight_policy,
    ray_autoscaling_config,
)


def _server(**autoscaling):
    return parse_config({"server": {"autoscaling": autoscaling}, "models": []}).server


def test_the_defaults_scale_between_one_and_two_replicas():
    server = _server()
    assert (server.autoscaling.min_replicas, server.autoscaling.max_replicas) == (1, 2)
    assert server.max_replicas() == 2
    assert parse_config({"server": {"replicas": 3}, "models": []}).server.max_replicas() == 3


@pytest.mark.parametrize("bad, field", [
    ({"min_replicas": 0}, "min_replicas"),
    ({"min_replicas": 3, "max_replicas": 2}, "max_replicas"),
    ({"max_replicas": 33}, "max_replicas"),
    ({"target_in_flight": 0}, "target_in_flight"),
    ({"upscale_delay_s": -1}, "upscale_delay_s"),
    ({"downscale_delay_s": 4000}, "downscale_delay_s"),
    ({"look_back_s": 0.1}, "look_back_s"),
])
def test_bounds_out_of_range_are_refused_naming_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        _server(**bad)


def test_an_unknown_field_is_refused():
    with pytest.raises(ConfigError, match="target_ongoing"):
        _server(target_ongoing_requests=2)


@pytest.mark.parametrize("counts, target, current, want", [
    ([], 4.0, 3, 3),  # nobody has reported yet: keep what there is
    ([0.0, 0.0], 4.0, 2, 1),  # idle: the fewest (Serve raises it to min_replicas)
    ([0.9], 4.0, 1, 1),
    ([4.0], 4.0, 1, 1),  # exactly at the target is enough
    ([4.5], 4.0, 1, 2),
    ([30.0, 2.0], 4.0, 2, 8),  # the sum counts, wherever the connections landed
    ([0.8, 0.7], 0.7, 2, 3),
])
def test_the_policy_wants_enough_replicas_for_the_target(counts, target, current, want):
    assert desired_replicas(counts, target, current) == want


def test_the_policy_reads_the_in_flight_metric_and_the_target_from_serves_context():
    ctx = SimpleNamespace(aggregated_metrics={IN_FLIGHT: {"r1": 9.0, "r2": 3.0}, "other": {"r1": 100.0}},
                          config=SimpleNamespace(target_ongoing_requests=4.0), target_num_replicas=2)
    assert in_flight_policy(ctx) == (3, {})
    ctx.aggregated_metrics = None
    assert in_flight_policy(ctx) == (2, {})


def test_serve_accepts_the_config_and_finds_the_policy():
    from ray.serve.config import AutoscalingConfig

    spec = _server(min_replicas=2, max_replicas=5, target_in_flight=6, upscale_delay_s=2).autoscaling
    raw = ray_autoscaling_config(spec, initial=1)
    cfg = AutoscalingConfig(**raw)
    assert (cfg.min_replicas, cfg.max_replicas, cfg.initial_replicas) == (2, 5, 2)  # initial kept in bounds
    assert cfg.target_ongoing_requests == 6 and cfg.upscale_delay_s == 2
    assert cfg.policy.policy_function == POLICY
    module, name = POLICY.split(":")
    assert getattr(__import__(module, fromlist=[name]), name) is in_flight_policy


def _model(**fields):
    return {"name": "m", "path": "/models/m.onnx", **fields}


def test_a_dedicated_model_takes_autoscaling_and_a_colocated_one_is_refused():
    cfg = parse_config({"models": [_model(placement="dedicated", autoscaling={"max_replicas": 3})]})
    assert cfg.models[0].autoscaling.max_replicas == 3
    with pytest.raises(ConfigError, match="autoscaling needs placement: dedicated"):
        parse_config({"models": [_model(autoscaling={"max_replicas": 3})]})


def test_a_model_autoscaling_error_names_the_model_field():
    with pytest.raises(ConfigError, match=r"max_replicas.*models\[0\]\.autoscaling"):
        parse_config({"models": [_model(placement="dedicated", autoscaling={"max_replicas": 40})]})
