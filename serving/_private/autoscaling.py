"""Autoscaling of the ingress on the in-flight counts its replicas measure.

Traffic reaches the ingress replicas' own HTTP and gRPC servers, not Serve's
proxy or handles, so Serve's request metrics see none of it. Each replica
reports its requests in flight (``Ingress.record_autoscaling_stats``, under
``IN_FLIGHT``); Serve averages each replica's reports over the look-back
window and calls :func:`in_flight_policy` with them, then applies the
config's bounds and delays to what it returns. This module is imported by
Serve's controller: it must stay free of Ray and of the rest of Flywheel.
"""

from __future__ import annotations

import math
from typing import Any

IN_FLIGHT = "in_flight"
POLICY = "flywheel.serving._private.autoscaling:in_flight_policy"
# how often each replica reports its count (the look-back window averages them)
METRICS_INTERVAL_S = 0.5


def desired_replicas(in_flight: list[float], target: float, current: int) -> int:
    """Replicas for ``in_flight`` (one averaged count per reporting replica)
    at ``target`` requests in flight each; ``current`` while no replica has
    reported yet (a deployment just started or replaced)."""
    if not in_flight:
        return current
    return max(1, math.ceil(sum(in_flight) / target - 1e-9))


def in_flight_policy(ctx: Any) -> tuple[int, dict]:
    """Serve's custom policy (``AutoscalingContext`` -> (replicas, state));
    the target is the config's ``target_ongoing_requests``, which
    :func:`ray_autoscaling_config` sets to the ingress's target_in_flight."""
    counts = (ctx.aggregated_metrics or {}).get(IN_FLIGHT, {})
    return desired_replicas(list(counts.values()), ctx.config.target_ongoing_requests, ctx.target_num_replicas), {}


def ray_autoscaling_config(spec: Any, initial: int) -> dict:
    """Serve's ``autoscaling_config`` for an AutoscalingConfig ``spec``
    (serving/config.py), starting with ``initial`` replicas (kept within
    its bounds)."""
    return {
        "min_replicas": spec.min_replicas,
        "max_replicas": spec.max_replicas,
        "initial_replicas": min(max(initial, spec.min_replicas), spec.max_replicas),
        "target_ongoing_requests": spec.target_in_flight,
        "upscale_delay_s": spec.upscale_delay_s,
        "downscale_delay_s": spec.downscale_delay_s,
        "look_back_period_s": spec.look_back_s,
        "metrics_interval_s": METRICS_INTERVAL_S,
        "policy": {"policy_function": POLICY},
    }
