"""Governance on the serving paths (real Ray Serve, real HTTP, API keys on): a
registry-backed variant whose gates fail is neither promoted
(``POST /v2/endpoints/{name}/promote``) nor canaried, traffic and the registry
stay as they were; an operate key (what a loop holds) may not approve; an admin
key's approval, recorded as ``key:<name>``, opens the gate once per identity,
and the promotion then moves traffic, stage and alias together.
(variants: _router_models.table_model.)
"""

from __future__ import annotations

import numpy as np
import pytest

from flywheel.client import Client, ClientError
from flywheel.registry import Registry, parse_policy
from flywheel.registry.keys import KeyStore
from flywheel.serving import DeployConfig, ModelConfig, ServerConfig
from flywheel.serving.app import deploy, undeploy
from flywheel.serving.config import AuthConfig, RegistryConfig

from _poll import wait_for
from _router_models import rows, table_model

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


@pytest.fixture(scope="module")
def governed(tmp_path_factory):
    home = tmp_path_factory.mktemp("governance")
    registry = RegistryConfig(uri=f"sqlite:///{home}/registry.db", artifacts=str(home / "art"))
    reg = Registry.open(registry.uri, registry.artifacts, cache_dir=str(home / "cache"))
    for v in (1, 2):
        reg.register_version("m", {"model.onnx": table_model(home / f"v{v}.onnx", 100, v)}, actor="tests",
                             metrics={"accuracy": 0.9 + v / 100})
    reg.set_alias("m", "production", 1, actor="tests")
    reg.set_policy("m", parse_policy({"rules": [{"rule": "approvals", "count": 1}]}), actor="tests")
    keys = KeyStore.open(registry.uri)
    tokens = {name: keys.create(name, [role], actor="tests")[1]
              for name, role in (("alice", "admin"), ("loop", "operate"))}
    keys.close()
    cfg = DeployConfig(
        name="governed",
        models=[ModelConfig(name="m", version="1", ref="m/1", num_cpus=0.05)],
        server=ServerConfig(port=0, grpc_port=-1, auth=AuthConfig(enabled=True, reload_interval_s=0.5)),
        registry=registry,
    )
    dep = deploy(cfg)
    try:
        with Client(dep.url, api_key=tokens["loop"]) as loop, Client(dep.url, api_key=tokens["alice"]) as admin:
            yield reg, loop, admin
    finally:
        undeploy(dep)
        reg.close()


def _production(reg) -> tuple[int | None, int | None]:
    return reg.production_version("m"), reg.get_model("m").aliases.get("production")


def _refused(call, status: int, match: str) -> None:
    with pytest.raises(ClientError, match=match) as err:
        call()
    assert err.value.status == status, err.value.message


def test_no_path_moves_production_past_a_failed_gate_until_an_admin_approves(governed):
    reg, loop, admin = governed
    loop.add_variant("m", {"version": "2", "ref": "m/2", "num_cpus": 0.05})
    wait_for(lambda: loop.endpoint("m")["variants"]["2"]["status"] == "ready", 30, "variant 2 loaded", every_s=0.2)
    before = loop.endpoint("m")["weights"]
    gate = r"approvals: 0 distinct approval\(s\) \[\], need 1"

    _refused(lambda: loop.promote("m", "2"), 412, gate)
    _refused(lambda: loop.start_canary("m", {"variant": "2", "steps": [50, 100], "hold_s": 1}), 412, gate)
    status = loop.endpoint("m")
    assert status["weights"] == before
    assert status["canary"] is None
    assert _production(reg) == (1, 1)
    assert loop.infer("m", rows(1, np.random.default_rng(0))).model_version == "1"

    # the loop's own key may not approve its candidate
    _refused(lambda: loop.approve("m", 2), 403, "lacks the 'admin' role")
    approved = admin.approve("m", 2, comment="reviewed the evaluation")
    assert approved["approvals"] == ["key:alice"]
    assert approved["gates"] == []
    _refused(lambda: admin.approve("m", 2), 409, "key:alice already approved m/2")
    entry = [e for e in reg.audit(model="m") if e.action == "approve"]
    assert [(e.actor, e.version, e.after) for e in entry] == [("key:alice", 2, {"comment": "reviewed the evaluation"})]

    assert loop.promote("m", "2")["weights"] == {"2": 1.0}
    assert _production(reg) == (2, 2)
    assert reg.get_version("m", 1).stage == "archived"
