"""API keys and roles on the real HTTP and gRPC servers, in-process (no Ray):
a replica and an ingress with auth on, keys in a real SQLite registry file."""

from __future__ import annotations

import http.client
import json
import os
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


def _server_config(grpc_server: str = "auto") -> ServerConfig:
    return ServerConfig(port=free_port(), grpc_port=free_port(), grpc_server=grpc_server,
                        auth=AuthConfig(enabled=True, reload_interval_s=0.2, max_concurrent_per_key=1))


@pytest.fixture(scope="module")
def secured(mlp_onnx, tmp_path_factory):
    home = tmp_path_factory.mktemp("auth")
    uri = f"sqlite:///{home}/registry.db"
    keys = KeyStore.open(uri)
    tokens = {role: keys.create(f"{role}-key", [role], actor="tests")[1] for role in ("predict", "operate", "admin")}
    # scoped keys: to mlp by a glob, and to other models only
    tokens["in-scope"] = keys.create("in-scope", ["predict"], actor="tests", models=["ml*"])[1]
    tokens["out-of-scope"] = keys.create("out-of-scope", ["predict"], actor="tests", models=["fraud-*", "digits"])[1]
    tokens["operate-out-of-scope"] = keys.create("operate-elsewhere", ["operate"], actor="tests", models=["fraud"])[1]
    limited = keys.create("limited", ["predict"], actor="tests")
    cfg = _server_config()
    port = free_port()
    secret = os.urandom(32)
    replica = ModelReplica(ModelConfig(name="mlp", version="1", path=mlp_onnx), port, cfg.request_limits(),
                           secret=secret)
    ingress = Ingress(cfg, [Route("mlp", "1", port)], keys_uri=uri, secret=secret)
    yield {"cfg": cfg, "uri": uri, "keys": keys, "tokens": tokens, "limited": limited, "home": home,
           "replica_port": port, "secret": secret}
    ingress.close()
    replica.close()
    keys.close()


@pytest.fixture(scope="module")
def grpc_ports(secured):
    """Both gRPC transports over the same keys: the HAProxy front of
    ``secured`` (the fast path, where the binary is installed) and a second
    ingress serving gRPC with grpc.aio."""
    cfg = _server_config("grpcio")
    ingress = Ingress(cfg, [Route("mlp", "1", secured["replica_port"])], keys_uri=secured["uri"],
                      secret=secured["secret"])
    yield {"front": secured["cfg"].grpc_port, "grpcio": cfg.grpc_port}
    ingress.close()


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


def _grpc(cfg, method, request, response_type, token=None, port=None):
    with grpc.insecure_channel(f"127.0.0.1:{port or cfg.grpc_port}") as ch:
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


# -- per-key limits: model scopes, expiry, request rate (issue 25) ----------

GRPC_TRANSPORTS = ["front", "grpcio"]


def _key_id(token: str) -> str:
    return token.split("_")[1]


def _error(body: bytes) -> str:
    return json.loads(body)["error"]


def test_a_scoped_key_calls_the_models_its_globs_name(secured):
    cfg, token = secured["cfg"], secured["tokens"]["in-scope"]
    assert call(cfg, "POST", INFER, token, BODY)[0] == 200
    assert call(cfg, "GET", "/v2/models/mlp/versions/1/ready", token)[0] == 200


@pytest.mark.parametrize("method, path", [
    ("POST", INFER), ("POST", "/v2/models/mlp/versions/1/infer"), ("GET", "/v2/models/mlp"),
    ("GET", "/v2/models/mlp/ready"), ("POST", "/v2/models/mlp/feedback"), ("GET", "//v2/models/mlp/"),
])
def test_a_key_scoped_to_other_models_gets_403_naming_key_and_model(secured, method, path):
    token = secured["tokens"]["out-of-scope"]
    status, body, _ = call(secured["cfg"], method, path, token, BODY if method == "POST" else None)
    assert status == 403
    assert _error(body) == f"API key {_key_id(token)} may not call model 'mlp' (its models: fraud-*, digits)"


@pytest.mark.parametrize("path", ["/v2/models/mlp/drift", "/v2/endpoints/mlp"])
def test_scopes_cover_the_operate_routes_of_a_model(secured, path):
    status, body, _ = call(secured["cfg"], "GET", path, secured["tokens"]["operate-out-of-scope"])
    assert status == 403
    assert "may not call model 'mlp'" in _error(body)


@pytest.mark.parametrize("path", ["/v2", "/metrics", "/v2/health/ready"])
def test_server_wide_routes_are_governed_by_role_alone(secured, path):
    assert call(secured["cfg"], "GET", path, secured["tokens"]["operate-out-of-scope"])[0] == 200


def test_an_out_of_scope_call_is_audited(secured):
    token = secured["tokens"]["out-of-scope"]
    assert call(secured["cfg"], "GET", "/v2/models/mlp/versions/1", token)[0] == 403
    reg = Registry.open(secured["uri"], str(secured["home"] / "artifacts"))
    try:
        denied = wait_for(lambda: [e for e in reg.audit(limit=100_000) if e.action == "auth.denied"
                                   and e.actor == _key_id(token) and e.after["route"] == "GET /v2/models/mlp/versions/1"],
                          5, "an auth.denied entry for the out-of-scope call", every_s=0.1)
        assert denied[-1].after["reason"] == "model mlp out of scope"
    finally:
        reg.close()


@pytest.mark.parametrize("transport", GRPC_TRANSPORTS)
def test_grpc_scopes_cover_every_method_that_names_a_model(secured, grpc_ports, transport):
    cfg, t = secured["cfg"], secured["tokens"]
    port = grpc_ports[transport]
    resp = _grpc(cfg, "ModelInfer", _infer_request(), pb.ModelInferResponse, t["in-scope"], port)
    assert resp.model_name == "mlp"
    for method, request, response_type in (
        ("ModelInfer", _infer_request(), pb.ModelInferResponse),
        ("ModelMetadata", pb.ModelMetadataRequest(name="mlp"), pb.ModelMetadataResponse),
        ("ModelReady", pb.ModelReadyRequest(name="mlp", version="1"), pb.ModelReadyResponse),
    ):
        with pytest.raises(grpc.RpcError) as err:
            _grpc(cfg, method, request, response_type, t["out-of-scope"], port)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
        assert f"API key {_key_id(t['out-of-scope'])} may not call model 'mlp'" in err.value.details(), method
    meta = _grpc(cfg, "ServerMetadata", pb.ServerMetadataRequest(), pb.ServerMetadataResponse, t["out-of-scope"], port)
    assert meta.name


def test_an_expired_key_is_refused_with_401_naming_it_on_every_transport(secured, grpc_ports):
    cfg, keys = secured["cfg"], secured["keys"]
    key, token = keys.create("brief", ["predict"], actor="tests", expires_at=time.time() + 1)

    def http_refusal():  # 401 "not valid" until the reload sees the key, 200 until it expires
        status, body, _ = call(cfg, "POST", INFER, token, BODY)
        return status == 401 and "expired" in _error(body) and _error(body)

    message = wait_for(http_refusal, 15, "the key to be refused as expired", every_s=0.1)
    assert message.startswith(f"API key {key.id} expired at ")
    for transport, port in grpc_ports.items():
        def grpc_refusal():
            try:
                _grpc(cfg, "ModelInfer", _infer_request(), pb.ModelInferResponse, token, port)
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in exc.details() and exc
            return False

        err = wait_for(grpc_refusal, 15, f"gRPC ({transport}) to refuse the expired key", every_s=0.1)
        assert f"API key {key.id} expired at " in err.details()


def _new_rate_limited_key(secured) -> str:
    """A key of one request per 100 s: its one token goes on the first call."""
    return secured["keys"].create("slow", ["predict"], actor="tests", rate=0.01, burst=1)[1]


def test_a_key_over_its_rate_gets_429_with_retry_after(secured):
    cfg = secured["cfg"]
    token = _new_rate_limited_key(secured)
    wait_for(lambda: call(cfg, "POST", INFER, token, BODY)[0] == 200, 5, "the new key's first call", every_s=0.05)
    status, body, resp = call(cfg, "POST", INFER, token, BODY)
    assert status == 429
    assert f"API key {_key_id(token)} is over its rate of 0.01 requests/s (burst 1); retry in" in _error(body)
    assert 1 <= int(resp.getheader("Retry-After")) <= 100  # one token at 0.01/s, whole seconds
    # other keys are not held back by it
    assert call(cfg, "POST", INFER, secured["tokens"]["predict"], BODY)[0] == 200


@pytest.mark.parametrize("transport", GRPC_TRANSPORTS)
def test_a_key_over_its_rate_gets_resource_exhausted_on_grpc(secured, grpc_ports, transport):
    cfg, port = secured["cfg"], grpc_ports[transport]
    token = _new_rate_limited_key(secured)

    def first_call():
        try:
            return _grpc(cfg, "ModelInfer", _infer_request(), pb.ModelInferResponse, token, port)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED  # not loaded yet
            return None

    wait_for(first_call, 5, "the new key's first call", every_s=0.05)
    with pytest.raises(grpc.RpcError) as err:
        _grpc(cfg, "ModelInfer", _infer_request(), pb.ModelInferResponse, token, port)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over its rate of 0.01 requests/s (burst 1); retry in" in err.value.details()
    trailing = dict(err.value.trailing_metadata())  # both transports: grpcio and the HAProxy front
    assert 1 <= int(trailing["retry-after"]) <= 100


def test_tritonclient_reports_the_rate_limit(secured):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    cfg = secured["cfg"]
    token = _new_rate_limited_key(secured)
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{cfg.port}")
    inp = httpclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 64), np.float32))
    try:
        wait_for(lambda: call(cfg, "GET", "/v2", token)[0] == 200, 5, "the new key to load", every_s=0.05)
        with pytest.raises(InferenceServerException, match="over its rate") as err:
            client.infer("mlp", [inp], headers={"authorization": f"Bearer {token}"})
        assert err.value.status() == "429"
    finally:
        client.close()


@pytest.mark.parametrize("method, path, role, allow", [
    ("POST", "/v2/health/live", None, "GET, HEAD"),
    ("POST", "/v2", "predict", "GET, HEAD"),
    ("DELETE", "/metrics", "operate", "GET, HEAD"),
    ("GET", INFER, "predict", "POST"),
    ("GET", "/v2/models/mlp/feedback", "predict", "POST"),
    ("PUT", "/v2/models/mlp", "predict", "GET, HEAD"),
    ("DELETE", "/v2/models/mlp/versions/1/ready", "predict", "GET, HEAD"),
    ("GET", "/v2/endpoints/mlp/canary", "admin", "DELETE, POST"),
    ("POST", "/v2/endpoints/mlp", "admin", "GET, HEAD"),
])
def test_every_405_says_which_methods_the_path_takes(secured, method, path, role, allow):
    status, body, resp = call(secured["cfg"], method, path, secured["tokens"][role] if role else None)
    assert status == 405
    assert resp.getheader("Allow") == allow
    assert _error(body).endswith(f"not {method}")


def test_head_is_answered_as_get_without_a_body_and_a_405_names_head(secured):
    token = secured["tokens"]["admin"]
    status, body, resp = call(secured["cfg"], "HEAD", "/v2/models/mlp", token)
    assert status == 200 and body == b"" and int(resp.getheader("Content-Length")) > 0
    status, body, resp = call(secured["cfg"], "HEAD", INFER, token)
    assert status == 405 and resp.getheader("Allow") == "POST" and body == b""
    status, _, resp = call(secured["cfg"], "HEAD", "/v2/endpoints/mlp/canary", token)
    assert status == 405 and resp.getheader("Allow") == "DELETE, POST"


def test_the_openapi_document_describes_retry_after_on_429(secured):
    status, body, _ = call(secured["cfg"], "GET", "/v2/openapi.json", secured["tokens"]["predict"])
    assert status == 200
    too_many = json.loads(body)["paths"]["/v2/models/{name}/infer"]["post"]["responses"]["429"]
    assert too_many["headers"]["Retry-After"]["schema"] == {"type": "integer", "minimum": 1}
