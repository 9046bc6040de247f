"""API keys and roles on the real HTTP and gRPC servers, in-process (no Ray):
a replica and an ingress with auth on, keys in a real SQLite registry file."""

from __future__ import annotations

import http.client
import json
import socket
import time

import grpc
import numpy as np
import pytest

from flywheel.registry import Registry
from flywheel.registry.keys import KeyStore
from flywheel.protocol.proto import inference_pb2 as pb
from flywheel.serving.config import AuthConfig, ModelConfig, ServerConfig
from flywheel.serving.ingress import Ingress
from flywheel.serving.replica import ModelReplica
from flywheel.serving.router import Route

from _poll import wait_for

BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]})
INFER = "/v2/models/mlp/infer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def secured(mlp_onnx, tmp_path_factory):
    home = tmp_path_factory.mktemp("auth")
    uri = f"sqlite:///{home}/registry.db"
    keys = KeyStore.open(uri)
    tokens = {role: keys.create(f"{role}-key", [role], actor="tests")[1] for role in ("predict", "operate")}
    limited = keys.create("limited", ["predict"], actor="tests")
    cfg = ServerConfig(port=free_port(), grpc_port=free_port(),
                       auth=AuthConfig(enabled=True, reload_interval_s=0.2, max_concurrent_per_key=1))
    port = free_port()
    replica = ModelReplica(ModelConfig(name="mlp", version="1", path=mlp_onnx), port, cfg.request_limits())
    ingress = Ingress(cfg, [Route("mlp", "1", port)], keys_uri=uri)
    yield {"cfg": cfg, "uri": uri, "keys": keys, "tokens": tokens, "limited": limited, "home": home}
    ingress.close()
    replica.close()
    keys.close()


def call(cfg, method, path, token=None, body=None):
    c = http.client.HTTPConnection("127.0.0.1", cfg.port, timeout=10)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    return r.status, r.read(), r


def test_health_checks_need_no_key(secured):
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert call(secured["cfg"], "GET", path)[0] == 200


@pytest.mark.parametrize("token", [None, "not-a-key", "fwk_0123456789ab_" + "A" * 43])
def test_missing_or_invalid_keys_get_401_with_the_scheme(secured, token):
    status, body, resp = call(secured["cfg"], "POST", INFER, token, BODY)
    assert status == 401
    assert resp.getheader("WWW-Authenticate") == "Bearer"
    assert "API key" in json.loads(body)["error"]
    # unknown routes too: nobody maps the API without a key
    assert call(secured["cfg"], "GET", "/v2/models/nope", token)[0] == 401


def test_roles_decide_what_a_valid_key_may_call(secured):
    cfg, t = secured["cfg"], secured["tokens"]
    status, body, _ = call(cfg, "POST", INFER, t["predict"], BODY)
    assert status == 200
    assert json.loads(body)["model_name"] == "mlp"
    assert call(cfg, "GET", "/v2/models/mlp", t["predict"])[0] == 200
    status, body, _ = call(cfg, "GET", "/metrics", t["predict"])
    assert status == 403
    assert "lacks the 'operate' role" in json.loads(body)["error"]
    assert call(cfg, "GET", "/metrics", t["operate"])[0] == 200
    assert call(cfg, "POST", INFER, t["operate"], BODY)[0] == 200  # operate includes predict


def _grpc(cfg, method, request, response_type, token=None):
    with grpc.insecure_channel(f"127.0.0.1:{cfg.grpc_port}") as ch:
        call = ch.unary_unary(f"/inference.GRPCInferenceService/{method}",
                              request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=response_type.FromString)
        md = [("authorization", f"Bearer {token}")] if token else None
        return call(request, metadata=md, timeout=10)


def _infer_request():
    req = pb.ModelInferRequest(model_name="mlp")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    req.raw_input_contents.append(np.zeros((1, 64), np.float32).tobytes())
    return req


def test_grpc_checks_the_authorization_metadata(secured):
    cfg, t = secured["cfg"], secured["tokens"]
    assert _grpc(cfg, "ServerLive", pb.ServerLiveRequest(), pb.ServerLiveResponse).live
    for token in (None, "junk"):
        with pytest.raises(grpc.RpcError) as err:
            _grpc(cfg, "ModelInfer", _infer_request(), pb.ModelInferResponse, token)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    resp = _grpc(cfg, "ModelInfer", _infer_request(), pb.ModelInferResponse, t["predict"])
    assert resp.model_name == "mlp"
    assert list(resp.outputs[0].shape) == [1, 10]
    meta = _grpc(cfg, "ModelMetadata", pb.ModelMetadataRequest(name="mlp"), pb.ModelMetadataResponse, t["operate"])
    assert meta.name == "mlp"


def test_concurrent_requests_per_key_are_limited_with_429(secured):
    cfg = secured["cfg"]
    _, token = secured["limited"]
    # two pipelined requests parsed together: the second arrives while the
    # first is in flight, so a limit of 1 refuses it, and only it
    head = (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n{BODY}").encode()
    with socket.create_connection(("127.0.0.1", cfg.port), timeout=10) as s:
        s.sendall(head + head)
        data = b""
        while data.count(b"HTTP/1.1 ") < 2 or not data.rstrip().endswith(b"}"):
            data += s.recv(65536)
    statuses = [int(part[:3]) for part in data.split(b"HTTP/1.1 ")[1:]]
    assert statuses == [200, 429]
    assert b"requests in flight (limit 1)" in data
    assert call(cfg, "POST", INFER, token, BODY)[0] == 200  # released afterwards


def test_a_revoked_key_stops_working_within_the_reload_interval(secured):
    cfg, keys = secured["cfg"], secured["keys"]
    key, token = keys.create("short-lived", ["predict"], actor="tests")
    # picked up by the next reload
    wait_for(lambda: call(cfg, "POST", INFER, token, BODY)[0] == 200, 5, "the new key to be accepted", every_s=0.05)
    keys.revoke(key.id, actor="tests")
    revoked_at = time.monotonic()
    while call(cfg, "POST", INFER, token, BODY)[0] != 401:
        assert time.monotonic() - revoked_at < 3, "revocation not applied within 3 s"
        time.sleep(0.05)
    assert time.monotonic() - revoked_at < 3


def test_refused_calls_are_audited_with_the_key_id_never_the_secret(secured):
    cfg = secured["cfg"]
    token = secured["tokens"]["predict"]
    call(cfg, "GET", "/metrics", token)  # 403: wrong role
    key_id = token.split("_")[1]
    reg = Registry.open(secured["uri"], str(secured["home"] / "artifacts"))
    try:
        denied = wait_for(lambda: [e for e in reg.audit(limit=100_000) if e.action == "auth.denied" and e.actor == key_id],
                          5, f"an auth.denied audit entry for {key_id}", every_s=0.1)
        assert denied[-1].after["reason"] == "role operate required"
        assert denied[-1].after["route"] == "GET /metrics"
        assert all(token.split("_", 2)[2] not in json.dumps(e.after) for e in reg.audit(limit=100_000))
    finally:
        reg.close()


def test_tritonclient_sends_keys_through_its_headers(secured):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    cfg, token = secured["cfg"], secured["tokens"]["predict"]
    headers = {"authorization": f"Bearer {token}"}
    x = np.zeros((1, 64), np.float32)
    for mod, url in ((httpclient, f"127.0.0.1:{cfg.port}"), (grpcclient, f"127.0.0.1:{cfg.grpc_port}")):
        client = mod.InferenceServerClient(url=url)
        inp = mod.InferInput("input", [1, 64], "FP32")
        inp.set_data_from_numpy(x)
        # a fresh dict each time: tritonclient.http adds its own headers to the one it gets
        assert client.infer("mlp", [inp], headers=dict(headers)).as_numpy("logits").shape == (1, 10)
        with pytest.raises(InferenceServerException) as err:
            client.infer("mlp", [inp])
        assert "API key" in str(err.value)
        client.close()


@pytest.mark.parametrize("path", ["/v2/models/mlp/drift", "//v2/models/mlp/drift", "/v2/models/mlp/versions/1/drift/",
                                  "//metrics"])
def test_operate_routes_cannot_be_reached_with_predict_by_rewriting_the_path(secured, path):
    assert call(secured["cfg"], "GET", path, secured["tokens"]["predict"])[0] == 403


def test_the_bench_harness_sends_the_key_from_the_environment(secured, monkeypatch):
    from flywheel.bench.harness import parse_scenario
    from flywheel.bench.harness.payloads import build_plan
    from flywheel.bench.harness.runner import run_against
    from flywheel.common.settings import load_settings

    cfg = secured["cfg"]
    sc = parse_scenario({"model": "mlp", "target": {"http": f"http://127.0.0.1:{cfg.port}",
                                                    "grpc": f"127.0.0.1:{cfg.grpc_port}"},
                         "mix": {"http_json": 1, "http_binary": 1, "grpc": 1}, "duration_s": 20, "warmup_s": 0,
                         "max_requests": 30})
    monkeypatch.setenv("FLYWHEEL_API_KEY", secured["tokens"]["predict"])
    assert "***" in repr(load_settings())
    assert secured["tokens"]["predict"] not in repr(load_settings())
    [step], _ = run_against(sc, build_plan(sc))
    assert (step.ok, step.errors) == (30, 0)
    assert set(step.protocols) == {"http_json", "http_binary", "grpc"}
