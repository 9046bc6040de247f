"""The console's ``/v2/registry`` and ``/v2/audit`` in-process (no Ray, no
sockets) against a real SQLite registry: reads shaped for a page, actions
through the registry's own gates and audit, 4xx naming the field."""

from __future__ import annotations

import asyncio
import json

import pytest

from flywheel.registry import Lineage, Registry, parse_policy
from flywheel.serving._private.console_http import ConsoleHttp
from flywheel.serving._private.dataplane import DataPlane
from flywheel.serving._private.http_routes import HttpRoutes, model_for, role_for
from flywheel.serving._private.http_server import Request
from flywheel.serving.metrics import ServingMetrics
from flywheel.serving.router import Router


@pytest.mark.parametrize("method, path, role", [
    ("GET", "/v2/registry/models", "operate"),
    ("GET", "/v2/registry/models/fraud/versions/2/lineage", "operate"),
    ("GET", "/v2/audit", "operate"),
    ("GET", "/v2/jobs/abc", "operate"),
    ("POST", "/v2/registry/models/fraud/versions/2/approve", "admin"),
    ("POST", "/v2/registry/models/fraud/versions/2/promote", "admin"),
    ("POST", "/v2/registry/models/fraud/rollback", "admin"),
    ("GET", "/v2/registry/models/fraud/rollback", "admin"),  # an action's path needs admin whatever the method
    ("POST", "/v2/jobs/abc/cancel", "admin"),
    ("DELETE", "/v2/registry/models/fraud", "admin"),
    ("GET", "/v2/registry/models/cancel", "operate"),  # actions are known by the path's shape, not a name
    ("GET", "/v2/jobs/approve", "operate"),
])
def test_reads_need_operate_and_actions_admin(method, path, role):
    assert role_for(path, method) == role


def test_a_scoped_key_is_checked_against_the_model_in_the_path():
    assert model_for("/v2/registry/models/fraud/versions/2") == "fraud"
    assert model_for("/v2/registry/models") is None
    assert model_for("/v2/audit") is None


@pytest.fixture
def console(tmp_path):
    uri, artifacts = f"sqlite:///{tmp_path}/registry.db", str(tmp_path / "artifacts")
    reg = Registry.open(uri, artifacts)
    reg.register_version("fraud", {"model.onnx": b"one"}, actor="os:trainer", metrics={"auc": 0.9},
                         lineage=Lineage(data_fingerprint="d" * 64, code_commit="c" * 40, job_id="job1"))
    reg.register_version("fraud", {"model.onnx": b"two"}, actor="os:trainer", metrics={"auc": 0.95},
                         lineage=Lineage(data_fingerprint="e" * 64, parent="fraud/1"))
    reg.promote("fraud", 1, "staging", actor="os:ops")
    reg.promote("fraud", 1, "production", actor="os:ops")
    reg.set_policy("fraud", parse_policy({"rules": [{"rule": "approvals", "count": 1}]}), actor="os:ops")
    reg.add_evaluation("fraud", 2, dataset="holdout", fingerprint="f" * 64, metrics={"auc": 0.94}, rows=10,
                       run_id="r1", actor="os:ops")
    con = ConsoleHttp(uri, artifacts)
    routes = HttpRoutes(DataPlane(Router([], ServingMetrics([]))), console=con)

    def call(method: str, path: str, body: bytes = b"", query: str = ""):
        resp = routes.handle(Request(method, path, {}, body, query))
        if asyncio.iscoroutine(resp):
            resp = asyncio.run(resp)
        return resp[0], json.loads(resp[1])

    yield call, reg
    con.close()
    reg.close()


def test_models_list_names_the_production_version(console):
    call, _ = console
    status, body = call("GET", "/v2/registry/models")
    assert status == 200
    assert [(m["name"], m["latest_version"], m["production_version"]) for m in body["models"]] == [("fraud", 2, 1)]


def test_a_model_shows_versions_with_stage_aliases_metrics_and_gates(console):
    call, _ = console
    status, body = call("GET", "/v2/registry/models/fraud")
    assert status == 200
    v1, v2 = body["versions"]
    assert (v1["stage"], v1["aliases"], v1["metrics"]) == ("production", ["production", "staging"], {"auc": 0.9})
    assert v2["gates"] and v2["gates"][0].startswith("approvals")
    assert body["policy"]["rules"][0]["rule"] == "approvals"


def test_lineage_is_nodes_and_edges(console):
    call, _ = console
    status, body = call("GET", "/v2/registry/models/fraud/versions/2/lineage")
    assert status == 200
    assert body["root"] == "fraud/2"
    edges = {(e["source"], e["target"], e["relation"]) for e in body["edges"]}
    assert ("fraud/2", "fraud/1", "derived_from") in edges
    assert ("fraud/1", "job:job1", "produced_by") in edges
    assert ("fraud/2", "data:" + "f" * 64, "evaluated_on") in edges
    ids = {n["id"] for n in body["nodes"]}
    assert {e["target"] for e in body["edges"]} <= ids


def test_an_unauthenticated_approval_is_refused(console):
    call, reg = console
    status, body = call("POST", "/v2/registry/models/fraud/versions/2/approve", b'{"comment": "ok"}')
    assert status == 403
    assert reg.approvals("fraud", 2) == []


def test_promotion_passes_the_registrys_gates(console):
    call, reg = console
    # the production alias is the gated move from any stage, as `flywheel models alias` takes it
    status, body = call("POST", "/v2/registry/models/fraud/versions/2/alias", b'{"alias": "production"}')
    assert status == 412
    assert "approvals" in body["error"]
    assert reg.production_version("fraud") == 1


def test_a_stage_move_is_audited_as_the_caller(console):
    call, reg = console
    status, body = call("POST", "/v2/registry/models/fraud/versions/2/promote", b'{"stage": "staging"}')
    assert (status, body["stage"], body["aliases"]) == (200, "staging", ["staging"])
    last = reg.audit(model="fraud", limit=1000)[-1]
    assert (last.actor, last.action, last.version) == ("http:unauthenticated", "alias", 2)


def test_rollback_restores_the_former_production_version(console):
    call, reg = console
    reg.approve("fraud", 2, actor="os:alice")
    reg.promote("fraud", 2, "staging", actor="os:ops")
    reg.promote("fraud", 2, "production", actor="os:ops")
    status, body = call("POST", "/v2/registry/models/fraud/rollback", b"")
    assert (status, body["version"], body["stage"]) == (200, 1, "production")


def test_audit_filters_by_action_newest_first(console):
    call, _ = console
    status, body = call("GET", "/v2/audit", query="action=stage&model=fraud&limit=1")
    assert status == 200
    assert body["limit"] == 1
    assert [(e["action"], e["after"]) for e in body["entries"]] == [("stage", {"stage": "production"})]


def test_audit_since_takes_iso_times(console):
    call, _ = console
    status, body = call("GET", "/v2/audit", query="since=2999-01-01T00:00:00")
    assert (status, body["entries"]) == (200, [])


@pytest.mark.parametrize("method, path, body, query, status, field", [
    ("GET", "/v2/audit", b"", "limit=0", 400, "limit"),
    ("GET", "/v2/audit", b"", "limit=ten", 400, "limit"),
    ("GET", "/v2/audit", b"", "since=yesterday", 400, "since"),
    ("GET", "/v2/audit", b"", "until=nan", 400, "until"),
    ("GET", "/v2/audit", b"", "actor=", 400, "actor"),
    ("GET", "/v2/audit", b"", "who=me", 400, "who"),
    ("GET", "/v2/audit", b"", "limit=1&limit=2", 400, "limit"),
    ("GET", "/v2/audit", b"", "since=20&until=10", 400, "until"),
    ("GET", "/v2/registry/models/fraud/versions/two", b"", "", 400, "version"),
    ("POST", "/v2/registry/models/fraud/versions/2/promote", b'{"stage": 3}', "", 400, "stage"),
    ("POST", "/v2/registry/models/fraud/versions/2/promote", b"{}", "", 400, "body"),
    ("POST", "/v2/registry/models/fraud/versions/2/promote", b'{"stage": "live"}', "", 400, None),
    ("POST", "/v2/registry/models/fraud/versions/2/alias", b'{"alias": "Bad Alias"}', "", 400, None),
    ("POST", "/v2/registry/models/fraud/rollback", b"[", "", 400, "body"),
    ("POST", "/v2/registry/models/fraud/rollback", b'{"to": "x", "y": 1}', "", 400, None),
])
def test_bad_input_is_a_400_naming_the_field(console, method, path, body, query, status, field):
    call, _ = console
    got, answer = call(method, path, body, query)
    assert got == status, answer
    assert answer["error"]
    if field is not None:
        assert answer["field"] == field


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v2/registry/models/nope", 404),
    ("GET", "/v2/registry/models/fraud/versions/9", 404),
    ("GET", "/v2/registry/models/fraud/versions/9/lineage", 404),
    ("POST", "/v2/registry/models/nope/rollback", 404),
    ("GET", "/v2/registry/models/fraud/versions/2/extra", 404),
    ("GET", "/v2/registry/other", 404),
    ("GET", "/v2/audit/more", 404),
    ("POST", "/v2/registry/models", 405),
    ("GET", "/v2/registry/models/fraud/versions/2/promote", 405),
])
def test_unknown_names_and_routes_are_404_and_wrong_methods_405(console, method, path, status):
    call, _ = console
    got, answer = call(method, path)
    assert got == status, answer


def test_without_a_registry_the_console_routes_answer_404():
    routes = HttpRoutes(DataPlane(Router([], ServingMetrics([]))))
    status, body, _ = routes.handle(Request("GET", "/v2/registry/models"))
    assert status == 404
    assert "no registry" in json.loads(body)["error"]
