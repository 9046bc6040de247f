"""The console's JSON API on a real deployment (Ray Serve, real HTTP, API
keys on): an operate key reads the registry and the audit log, a
predict-only key is refused (403), no key is 401; an admin's approval goes
through the registry's gates and shows up in the audit log as its key.
(The routes' logic is covered without Ray in tests/unit/serving/test_console_*.)
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest

from flywheel.registry import Registry, parse_policy
from flywheel.registry.keys import KeyStore
from flywheel.serving import DeployConfig, ModelConfig, ServerConfig
from flywheel.serving.app import deploy, undeploy
from flywheel.serving.config import AuthConfig, RegistryConfig

from _router_models import table_model

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    home = tmp_path_factory.mktemp("console")
    registry = RegistryConfig(uri=f"sqlite:///{home}/registry.db", artifacts=str(home / "art"))
    reg = Registry.open(registry.uri, registry.artifacts, cache_dir=str(home / "cache"))
    for v in (1, 2):
        reg.register_version("m", {"model.onnx": table_model(home / f"v{v}.onnx", 100, v)}, actor="tests",
                             metrics={"accuracy": 0.9 + v / 100})
    reg.set_policy("m", parse_policy({"rules": [{"rule": "approvals", "count": 1}]}), actor="tests")
    reg.close()
    keys = KeyStore.open(registry.uri)
    tokens = {name: keys.create(name, [role], actor="tests")[1]
              for name, role in (("alice", "admin"), ("ops", "operate"), ("app", "predict"))}
    keys.close()
    cfg = DeployConfig(
        name="console",
        models=[ModelConfig(name="m", version="1", ref="m/1", num_cpus=0.05)],
        server=ServerConfig(port=0, grpc_port=-1, auth=AuthConfig(enabled=True, reload_interval_s=0.5)),
        registry=registry,
    )
    dep = deploy(cfg)
    url = urlsplit(dep.url)
    try:
        yield url.hostname, url.port, tokens
    finally:
        undeploy(dep)


def _call(console, method: str, path: str, key: str | None, body: bytes | None = None):
    host, port, tokens = console
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {tokens[key]}"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_an_operate_key_reads_the_registry_and_others_are_refused(console):
    status, body = _call(console, "GET", "/v2/registry/models/m", "ops")
    assert status == 200, body
    assert [(v["version"], v["metrics"]["accuracy"]) for v in body["versions"]] == [(1, 0.91), (2, 0.92)]
    assert body["versions"][1]["gates"][0].startswith("approvals")
    assert _call(console, "GET", "/v2/registry/models/m", "app")[0] == 403
    assert _call(console, "GET", "/v2/audit", None)[0] == 401
    assert _call(console, "POST", "/v2/registry/models/m/versions/2/approve", "ops", b"{}")[0] == 403


def test_an_admin_approval_passes_the_gate_and_is_audited_as_its_key(console):
    status, body = _call(console, "POST", "/v2/registry/models/m/versions/2/approve", "alice",
                         b'{"comment": "looks right"}')
    assert status == 200, body
    assert ([a["actor"] for a in body["approvals"]], body["gates"]) == (["key:alice"], [])
    status, page = _call(console, "GET", "/v2/audit?actor=key:alice&action=approve&model=m", "ops")
    assert status == 200, page
    assert [(e["version"], e["after"]) for e in page["entries"]] == [(2, {"comment": "looks right"})]
