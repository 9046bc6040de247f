"""The approval route's HTTP edges in-process (no Ray, no sockets): it needs
the admin role, and without auth there is no identity to record, so it
answers 403 saying so (the approval itself, through a real deployment:
tests/integration/test_governance.py)."""

from __future__ import annotations

import json

import pytest

from flywheel.serving._private.dataplane import DataPlane
from flywheel.serving._private.http_routes import HttpRoutes, model_for, role_for
from flywheel.serving._private.http_server import Request
from flywheel.serving.metrics import ServingMetrics
from flywheel.serving.router import Router

APPROVE = "/v2/models/fraud/versions/2/approve"


@pytest.mark.parametrize("path", [APPROVE, "//v2/models/fraud/versions/2/approve/"])
def test_approving_needs_the_admin_role_and_the_models_scope(path):
    assert role_for(path) == "admin"
    assert model_for(path) == "fraud"


def test_operate_routes_are_unchanged():
    assert role_for("/v2/endpoints/fraud/promote") == "operate"
    assert role_for("/v2/models/fraud/versions/2/infer") == "predict"


def _routes() -> HttpRoutes:
    async def manage(op, name, body):  # never reached: the route refuses before
        raise AssertionError(f"the controller was called: {op} {name} {body}")

    return HttpRoutes(DataPlane(Router([], ServingMetrics([]))), manage=manage)


def test_without_auth_an_approval_is_refused_for_want_of_an_identity():
    status, body, _ = _routes().handle(Request("POST", APPROVE, {}, b'{"comment": "ok"}'))
    assert status == 403
    assert "approvals need an authenticated identity" in json.loads(body)["error"]


def test_only_post_approves():
    status, _, _, allow = _routes().handle(Request("GET", APPROVE, {}, b""))
    assert status == 405
    assert b"POST" in allow
