"""``/v2/loops`` in-process (no Ray, no sockets) against a real SQLite loop
store: reading needs operate, changing admin; changes are queued as loop
events naming who asked; bad bodies and methods are 4xx naming the field."""

from __future__ import annotations

import asyncio
import json

import pytest

from flywheel.registry import LoopStore
from flywheel.serving._private.dataplane import DataPlane
from flywheel.serving._private.http_routes import HttpRoutes, role_for
from flywheel.serving._private.http_server import Request
from flywheel.serving._private.loops_http import LoopsHttp
from flywheel.serving.metrics import ServingMetrics
from flywheel.serving.router import Router


@pytest.mark.parametrize("method, path, role", [
    ("GET", "/v2/loops", "operate"),
    ("GET", "/v2/loops/keep", "operate"),
    ("GET", "/v2/loops/keep/runs", "operate"),
    ("POST", "/v2/loops/keep/trigger", "admin"),
    ("POST", "/v2/loops/keep/pause", "admin"),
    ("GET", "/v2/loops/keep/resume", "admin"),  # a change's path needs admin whatever the method
    ("DELETE", "/v2/loops/keep", "admin"),
])
def test_reading_loops_needs_operate_and_changing_them_admin(method, path, role):
    assert role_for(path, method) == role


@pytest.fixture
def face(tmp_path):
    uri = f"sqlite:///{tmp_path}/registry.db"
    store = LoopStore.open(uri)
    store.save_state("shop", "keep", {})
    store.start_run("shop", "keep", "fraud", trigger="manual", reason="by hand", phase="training")
    loops = LoopsHttp("shop", "shop", uri, str(tmp_path / "artifacts"))
    routes = HttpRoutes(DataPlane(Router([], ServingMetrics([]))), loops=loops)

    def call(method: str, path: str, body: bytes = b"", query: str = ""):
        resp = routes.handle(Request(method, path, {}, body, query))
        if asyncio.iscoroutine(resp):
            resp = asyncio.run(resp)
        return resp[0], json.loads(resp[1])

    yield call, store
    loops.close()
    store.close()


def test_list_and_runs_read_the_store(face):
    call, _ = face
    status, body = call("GET", "/v2/loops")
    assert status == 200
    assert body["loops"][0]["current_run"]["phase"] == "training"
    status, body = call("GET", "/v2/loops/keep/runs")
    assert [r["trigger"] for r in body["runs"]] == ["manual"]


def test_runs_take_a_limit_and_refuse_a_bad_one_naming_it(face):
    call, store = face
    first = store.runs("shop", "keep")[0]
    store.update_run(first.id, outcome="promoted", finish=True)  # one run per endpoint at a time
    store.start_run("shop", "keep", "fraud", trigger="drift", reason="flagged", phase="training")
    status, body = call("GET", "/v2/loops/keep/runs", query="limit=1")
    assert (status, len(body["runs"])) == (200, 1)
    for bad in ("limit=0", "limit=x", "limit=1&limit=2", "top=3"):
        status, body = call("GET", "/v2/loops/keep/runs", query=bad)
        assert status == 400 and body["field"] in ("limit", "top"), (bad, body)


def test_a_trigger_is_queued_with_its_note(face):
    call, store = face
    status, body = call("POST", "/v2/loops/keep/trigger", b'{"note": "labels are in"}')
    assert (status, body["requested"]) == (202, "trigger")
    ev = [e for e in store.events("shop", "keep") if e.kind == "trigger_requested"][0]
    assert ev.detail == {"actor": "http:unauthenticated", "note": "labels are in"}


@pytest.mark.parametrize("method, path, body, status, fragment", [
    ("POST", "/v2/loops/keep/pause", b'{"note": 3}', 400, "note"),
    ("POST", "/v2/loops/keep/pause", b"{", 400, "JSON"),
    ("GET", "/v2/loops/keep/pause", b"", 405, "POST"),
    ("POST", "/v2/loops/keep", b"", 405, "GET"),
    ("GET", "/v2/loops/nope", b"", 404, "no loop 'nope'"),
    ("GET", "/v2/loops/keep/runs/extra", b"", 404, "no route"),
])
def test_bad_requests_get_a_4xx_that_says_why(face, method, path, body, status, fragment):
    call, _ = face
    got, doc = call(method, path, body)
    assert got == status
    assert fragment in doc["error"]


def test_a_deployment_without_loops_answers_404():
    routes = HttpRoutes(DataPlane(Router([], ServingMetrics([]))))
    status, body, _ = routes.handle(Request("GET", "/v2/loops", {}, b""))
    assert status == 404
    assert "runs no loops" in json.loads(body)["error"]
