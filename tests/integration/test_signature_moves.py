"""Traffic never moves to an incompatible model (real Ray Serve, real HTTP):
add_variant, swap and a canary's start refuse a model whose signature differs
from the endpoint's with a 400 naming the first difference, change nothing,
and go ahead, recorded, when the request allows the change.

Models: version 1 is _router_models.table_model (x: FP32 [batch, 4] -> y);
the candidates are _signature_models.matmul_model with x FP64 or an added
output.
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import numpy as np
import pytest

from flywheel.client import Client, ClientError
from flywheel.serving import DeployConfig, ModelConfig, ServerConfig
from flywheel.serving.app import deploy, undeploy
from flywheel.registry import Registry
from flywheel.serving.config import EndpointConfig, RegistryConfig

from _poll import wait_for
from _router_models import table_model
from _signature_models import matmul_model

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

FP64_DIFF = "input 'x': datatype FP32 on the endpoint (version 1), FP64 on version 2"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("signature-models")
    return {
        "1": table_model(d / "v1.onnx", 100, 1),
        "fp64": matmul_model(d / "fp64.onnx", x_type="DOUBLE"),
        "more": matmul_model(d / "more.onnx", extra_output="p"),
        "same": matmul_model(d / "same.onnx"),
    }


def _deployment(name: str, model_path: str, home, endpoints=()) -> DeployConfig:
    return DeployConfig(
        name=name, models=[ModelConfig(name="m", version="1", path=model_path, num_cpus=0.05)],
        endpoints=list(endpoints), server=ServerConfig(port=0, grpc_port=-1),
        registry=RegistryConfig(uri=f"sqlite:///{home}/registry.db", artifacts=str(home / "art")),
    )


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    home = tmp_path_factory.mktemp("signature-home")
    dep = deploy(_deployment("signatures", models["1"], home))
    with Client(dep.url) as client:
        yield dep, client, home
    undeploy(dep)


def _routing(status: dict) -> tuple:
    """What a refused move must leave as it was."""
    return (sorted(status["variants"]), status["weights"], status["policy"], status["swap"], status["canary"])


def _variant(path: str, version: str = "2") -> dict:
    return {"version": version, "path": path, "num_cpus": 0.05}


def _post(url: str, path: str, body: dict) -> tuple[int, dict]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _remove(client: Client, version: str) -> None:
    client.remove_variant("m", version)
    wait_for(lambda: version not in client.endpoint("m")["variants"], 60, f"variant {version} to be removed")


def test_a_swap_to_a_different_signature_is_a_400_naming_the_difference(served, models):
    dep, client, _ = served
    before = _routing(client.endpoint("m"))
    status, body = _post(dep.url, "/v2/endpoints/m/swap", _variant(models["fp64"]))
    assert status == 400
    assert FP64_DIFF in body["error"]
    assert _routing(client.endpoint("m")) == before


def test_the_client_raises_the_same_refusal_for_add_variant(served, models):
    dep, client, _ = served
    before = _routing(client.endpoint("m"))
    with pytest.raises(ClientError) as refused:
        client.add_variant("m", _variant(models["fp64"]))
    assert refused.value.status == 400
    assert FP64_DIFF in refused.value.message
    assert _routing(client.endpoint("m")) == before
    assert client.infer("m", np.zeros((1, 4), np.float32)).model_version == "1"


def test_an_added_output_is_refused(served, models):
    dep, client, _ = served
    with pytest.raises(ClientError, match="output 'p': not on the endpoint \\(version 1\\), added by version 2"):
        client.swap("m", _variant(models["more"]))


def test_a_compatible_variant_is_taken(served, models):
    dep, client, _ = served
    assert client.add_variant("m", _variant(models["same"], "3"))["variants"]["3"]["status"] == "loading"
    wait_for(lambda: client.endpoint("m")["variants"]["3"]["status"] == "ready", 60, "variant 3 to be ready")
    assert not [e for e in client.endpoint("m")["events"] if e["kind"] == "signature"]
    _remove(client, "3")


def test_an_allowed_change_goes_ahead_is_recorded_and_each_canary_is_checked(served, models):
    dep, client, _ = served
    client.add_variant("m", _variant(models["fp64"]), allow_signature_change=True)
    status = wait_for(lambda: (s := client.endpoint("m"))["variants"].get("2", {}).get("status") == "ready" and s,
                      60, "variant 2 (FP64) to be ready")
    recorded = [e["detail"] for e in status["events"] if e["kind"] == "signature"]
    assert len(recorded) == 1 and FP64_DIFF in recorded[0] and "the request's" in recorded[0]

    # the variant being there does not let a canary move traffic to it: the
    # canary's own check refuses (judged on the signatures the replicas reported)
    before = _routing(status)
    with pytest.raises(ClientError) as refused:
        client.start_canary("m", {"variant": "2", "hold_s": 60})
    assert refused.value.status == 400
    assert FP64_DIFF in refused.value.message
    assert _routing(client.endpoint("m")) == before

    started = client.start_canary("m", {"variant": "2", "hold_s": 60}, allow_signature_change=True)
    assert started["canary"]["status"] == "running"
    events = client.endpoint("m")["events"]
    assert sum(e["kind"] == "signature" for e in events) == 2
    client.abort_canary("m")
    _remove(client, "2")
    assert client.endpoint("m")["weights"] == {"1": 1.0}


def test_a_registry_version_is_judged_by_its_artifact(served, models):
    dep, client, home = served
    reg = Registry.open(f"sqlite:///{home}/registry.db", str(home / "art"))
    try:
        mv = reg.register_version("m", {"model.onnx": models["fp64"]}, actor="test")
    finally:
        reg.close()
    before = _routing(client.endpoint("m"))
    with pytest.raises(ClientError) as refused:
        client.swap("m", {"version": "2", "ref": mv.ref, "num_cpus": 0.05})
    assert refused.value.status == 400
    assert FP64_DIFF in refused.value.message
    assert _routing(client.endpoint("m")) == before


def test_the_endpoint_config_may_allow_changes(models, tmp_path_factory):
    home = tmp_path_factory.mktemp("signature-allowed")
    cfg = _deployment("signatures-allowed", models["1"], home, [EndpointConfig(name="m", allow_signature_change=True)])
    dep = deploy(cfg)
    try:
        with Client(dep.url) as client:
            assert client.swap("m", _variant(models["fp64"]))["swap"]["phase"] == "loading"
            status = wait_for(lambda: (s := client.endpoint("m"))["swap"]["phase"] in ("done", "failed") and s,
                              60, "the swap to 2 to end")
            assert status["swap"]["phase"] == "done", status["swap"]
            recorded = [e["detail"] for e in status["events"] if e["kind"] == "signature"]
            assert len(recorded) == 1 and FP64_DIFF in recorded[0] and "the endpoint config's" in recorded[0]
            answer = client.infer("m", np.ones((2, 4), np.float64))
            assert answer.model_version == "2"
    finally:
        undeploy(dep)
