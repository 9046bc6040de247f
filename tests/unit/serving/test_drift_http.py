"""``/v2/drift/{name}``: the drift monitor's history turned into one series
per (test, feature) and the windows that drifted (no Ray: the shaping on
entries as the monitor keeps them, and the route's 4xx)."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from flywheel.serving._private.dataplane import DataPlane
from flywheel.serving._private.drift_http import shape_history
from flywheel.serving._private.http_routes import HttpRoutes, model_for, role_for
from flywheel.serving._private.http_server import Request
from flywheel.serving.metrics import ServingMetrics
from flywheel.serving.router import Router


def _entry(ts: float, test: str, stats: list[float], ps: list[float], drift: list[bool]) -> dict:
    return {"ts": ts, "test": test, "any_drift": any(drift),
            "result": {"test": test, "backend": "numpy", "statistic": stats, "p_value": ps, "p_adjusted": ps,
                       "drift": drift, "n_reference": 100, "n_window": 50}}


def test_history_becomes_series_per_feature_and_flagged_windows():
    shaped = shape_history("fraud", "2", [
        _entry(10.0, "ks", [0.1, 0.2], [0.5, 0.4], [False, False]),
        _entry(20.0, "ks", [0.1, 0.9], [0.5, 0.001], [False, True]),
        _entry(20.0, "psi", [0.3, 0.05], [math.nan, math.nan], [True, False]),
    ])
    series = {(s.test, s.feature): [(p.ts, p.statistic, p.p_value, p.drift) for p in s.points] for s in shaped.series}
    assert series[("ks", "1")] == [(10.0, 0.2, 0.4, False), (20.0, 0.9, 0.001, True)]
    assert series[("psi", "0")] == [(20.0, 0.3, None, True)]  # psi has no p-value
    assert [(w.ts, w.test, w.features) for w in shaped.flagged] == [(20.0, "ks", ["1"]), (20.0, "psi", ["0"])]


def test_drift_series_need_operate_and_are_scoped_to_the_model():
    assert role_for("/v2/drift/fraud") == "operate"
    assert model_for("/v2/drift/fraud") == "fraud"


@pytest.mark.parametrize("path, query, status, fragment", [
    ("/v2/drift/fraud", "versoin=2", 400, "versoin"),
    ("/v2/drift/fraud", "version=", 400, "version"),
    ("/v2/drift/fraud", "", 404, "fraud"),
    ("/v2/drift", "", 404, "no route"),
    ("/v2/drift/fraud/extra", "", 404, "no route"),
])
def test_bad_drift_requests_get_a_4xx_that_says_why(path, query, status, fragment):
    routes = HttpRoutes(DataPlane(Router([], ServingMetrics([]))))
    resp = routes.handle(Request("GET", path, {}, b"", query))
    if asyncio.iscoroutine(resp):
        resp = asyncio.run(resp)
    assert resp[0] == status
    assert fragment in json.loads(resp[1])["error"]
