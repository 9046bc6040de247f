"""One data plane for both transports (serving/_private/dataplane.py).

A real Router over in-process fake models, driven through the real HTTP and
gRPC adapters: a request asks the router one question, and a case gets the
same answer (or error) on both transports, from the same data-plane function.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from flywheel.protocol.errors import ErrorCode, FlywheelError
from flywheel.protocol.proto import inference_pb2 as pb
from flywheel.serving._private.dataplane import DataPlane
from flywheel.serving._private.grpc_service import GrpcCalls
from flywheel.serving._private.http_errors import status_for
from flywheel.serving._private.http_routes import HttpRoutes
from flywheel.serving._private.http_server import Request
from flywheel.serving._private.wire import OP_INFER_GRPC, OP_METADATA, Reply
from flywheel.serving.metrics import ServingMetrics
from flywheel.serving.router import Route, Router

from _poll import wait_for_async

STICKY = {"header": "flywheel-routing-key", "parameter": "routing_key"}


class FakeModel:
    """An in-process model server (what LocalChannel calls): answers its
    metadata, and every infer with one output, or with the error it is given."""

    def __init__(self, name: str, version: str, error: tuple[ErrorCode, str] | None = None) -> None:
        self.name, self.version, self.error = name, version, error
        self.infers = 0

    async def handle(self, call):
        if call.op == OP_METADATA:
            meta = {"name": self.name, "platform": "fake",
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1]}],
                    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}]}
            return Reply(0, json.dumps(meta).encode())
        self.infers += 1
        if self.error is not None:
            return Reply(int(self.error[0]), self.error[1].encode())
        if call.op == OP_INFER_GRPC:
            return Reply(0, pb.ModelInferResponse(
                model_name=self.name, model_version=self.version,
                outputs=[pb.ModelInferResponse.InferOutputTensor(name="y", datatype="FP32", shape=[1])],
                raw_output_contents=[np.float32(1.0).tobytes()],
            ).SerializeToString())
        out = {"model_name": self.name, "model_version": self.version,
               "outputs": [{"name": "y", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
        return Reply(0, json.dumps(out).encode())


class CountingRouter(Router):
    """A real Router that logs every public method a request calls on it."""

    log: list[str]


def _logged(name: str):
    base = getattr(Router, name)
    if asyncio.iscoroutinefunction(base):
        async def method(self, *args, **kwargs):
            self.log.append(name)
            return await base(self, *args, **kwargs)
    else:
        def method(self, *args, **kwargs):
            self.log.append(name)
            return base(self, *args, **kwargs)
    return method


for _name in [n for n in vars(Router) if not n.startswith("_") and callable(getattr(Router, n))]:
    setattr(CountingRouter, _name, _logged(_name))


class RecordingPlane(DataPlane):
    """The real data plane, logging which of its functions an adapter calls."""

    def __init__(self, router: Router) -> None:
        super().__init__(router)
        self.log: list[str] = []

    def __getattribute__(self, name: str):
        if name in ("infer", "model", "model_ready", "model_metadata", "server_live", "server_ready"):
            object.__getattribute__(self, "log").append(name)
        return object.__getattribute__(self, name)


async def _serving():
    """The data plane over: m (one version, untracked), t (1 and 2, a 50/50
    split: tracked, sticky keys), s (1 answers, 2 shadows every request),
    bad (answers every infer with an error), u (its only routable variant is
    not loaded here), late (never probed: not ready, no metadata)."""
    models = {(n, v): FakeModel(n, v) for n, v in [("m", "1"), ("t", "1"), ("t", "2"), ("s", "1"), ("s", "2"),
                                                   ("u", "1"), ("late", "1")]}
    models[("bad", "1")] = FakeModel("bad", "1", (ErrorCode.INVALID_ARGUMENT, "input 'x': expected FP32"))
    routes = [Route(n, v, local=True) for n, v in models]
    router = CountingRouter(routes, ServingMetrics([(r.name, r.version) for r in routes]), models)
    router.log = []
    for entry in router.models():
        if entry.route.name != "late":
            await Router.probe(router, entry)
    Router.endpoint(router, "t").configure({"routable": ["1", "2"], "weights": {"1": 1.0, "2": 1.0},
                                            "sticky": STICKY}, {"1", "2"})
    Router.endpoint(router, "s").configure({"routable": ["1", "2"], "weights": {"1": 1.0}, "sticky": STICKY,
                                            "shadow": {"variant": "2", "fraction": 1.0}}, {"1", "2"})
    Router.endpoint(router, "u").configure({"routable": ["9"], "weights": {"9": 1.0}, "sticky": STICKY}, {"1"})
    plane = RecordingPlane(router)
    return plane, HttpRoutes(plane), GrpcCalls(plane), models


async def _http(routes: HttpRoutes, method: str, path: str, body: bytes = b"", **headers: str):
    """(status, JSON body or None, response headers) of one request."""
    req = Request(method, path, {k.replace("_", "-").encode(): v.encode() for k, v in headers.items()}, body)
    resp = routes.handle(req)
    if type(resp) is not tuple:
        resp = await resp
    extra = dict(line.split(": ", 1) for line in resp[3].decode().splitlines()) if len(resp) > 3 else {}
    return resp[0], json.loads(resp[1]) if resp[1] else None, extra


async def _grpc(calls: GrpcCalls, method: str, message, **metadata: str):
    """(response bytes, trailing metadata as a dict), or the FlywheelError."""
    md = {k.replace("_", "-"): v for k, v in metadata.items()}
    try:
        body, trailing = await calls.call(method, message.SerializeToString(), md.get, None)
    except FlywheelError as exc:
        return exc
    return body, dict(trailing)


def _infer_body(**extra) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [0.5]}], **extra}).encode()


def _infer_message(name: str, version: str = "", **fields) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name=name, model_version=version, **fields)


def test_one_infer_asks_the_router_one_question_on_either_transport():
    async def run():
        plane, http, grpc, _ = await _serving()
        router = plane.router
        for name in ("m", "t"):
            router.log.clear()
            await _http(http, "POST", f"/v2/models/{name}/infer", _infer_body(), flywheel_request_id="r-1")
            assert router.log.count("route") == 1
            assert router.log == ["route", "forward"] + (["routed"] if name == "t" else [])
            router.log.clear()
            await _grpc(grpc, "ModelInfer", _infer_message(name, id="r-2"))
            assert router.log == ["route", "forward", "routed"]

    asyncio.run(run())


def test_metadata_calls_ask_the_router_one_question():
    async def run():
        plane, http, grpc, _ = await _serving()
        router = plane.router
        for path, method, message in [("/v2/models/t", "ModelMetadata", pb.ModelMetadataRequest(name="t")),
                                      ("/v2/models/t/ready", "ModelReady", pb.ModelReadyRequest(name="t"))]:
            router.log.clear()
            await _http(http, "GET", path)
            assert router.log == ["route"]
            router.log.clear()
            await _grpc(grpc, method, message)
            assert router.log == ["route"]

    asyncio.run(run())


# (case, HTTP path, HTTP headers, JSON fields, gRPC message, gRPC metadata)
_INFER_CASES = [
    ("highest version", "/v2/models/m/infer", {}, {}, _infer_message("m"), {}),
    ("named version", "/v2/models/t/versions/2/infer", {}, {}, _infer_message("t", "2"), {}),
    ("unknown model", "/v2/models/nope/infer", {}, {}, _infer_message("nope"), {}),
    ("unknown version", "/v2/models/t/versions/7/infer", {}, {}, _infer_message("t", "7"), {}),
    ("the model's own error", "/v2/models/bad/infer", {}, {}, _infer_message("bad"), {}),
    ("no ready variant", "/v2/models/u/infer", {}, {}, _infer_message("u"), {}),
    # (t splits at random without a sticky key: the key pins the variant)
    ("id in the request", "/v2/models/t/infer", {"flywheel_routing_key": "alice"}, {"id": "abc"},
     _infer_message("t", id="abc"), {"flywheel_routing_key": "alice"}),
    ("id as header or metadata", "/v2/models/t/infer", {"flywheel_request_id": "abc", "flywheel_routing_key": "carol"},
     {}, _infer_message("t"), {"flywheel_request_id": "abc", "flywheel_routing_key": "carol"}),
    ("sticky key", "/v2/models/t/infer", {"flywheel_routing_key": "alice"}, {},
     _infer_message("t"), {"flywheel_routing_key": "alice"}),
    ("sticky parameter", "/v2/models/t/infer", {}, {"parameters": {"routing_key": "bob"}},
     _infer_message("t", parameters={"routing_key": pb.InferParameter(string_param="bob")}),
     {}),
]


@pytest.mark.parametrize("case, path, headers, fields, message, metadata", _INFER_CASES,
                         ids=[c[0] for c in _INFER_CASES])
def test_http_and_grpc_infer_give_the_same_answer(case, path, headers, fields, message, metadata):
    async def run():
        plane, http, grpc, _ = await _serving()
        status, body, extra = await _http(http, "POST", path, _infer_body(**fields), **headers)
        via_http = plane.log[:]
        plane.log.clear()
        got = await _grpc(grpc, "ModelInfer", message, **metadata)
        assert plane.log == via_http == ["infer"]
        if isinstance(got, FlywheelError):
            assert status == status_for(got.code)
            assert body == {"error": got.message}
            return
        payload, trailing = got
        assert status == 200
        assert extra["flywheel-model-version"] == trailing["flywheel-model-version"]
        assert pb.ModelInferResponse.FromString(payload).model_version == body["model_version"]
        # the caller's id, or one of ours (each its own), or none (untracked)
        assert ("flywheel-request-id" in extra) == ("flywheel-request-id" in trailing)
        if "id" in case:
            assert extra["flywheel-request-id"] == trailing["flywheel-request-id"] == "abc"

    asyncio.run(run())


@pytest.mark.parametrize("case, code, message", [
    ("unknown model", ErrorCode.NOT_FOUND, "unknown model 'nope'"),
    ("unknown version", ErrorCode.NOT_FOUND, "model 't' has no version '7'; it has ['1', '2']"),
    ("the model's own error", ErrorCode.INVALID_ARGUMENT, "input 'x': expected FP32"),
    ("no ready variant", ErrorCode.UNAVAILABLE, "endpoint 'u' has no ready variant"),
])
def test_an_infer_error_is_the_same_error_on_both_transports(case, code, message):
    _, path, headers, fields, grpc_message, metadata = next(c for c in _INFER_CASES if c[0] == case)

    async def run():
        _, http, grpc, _ = await _serving()
        assert await _http(http, "POST", path, _infer_body(**fields)) == (status_for(code), {"error": message}, {})
        got = await _grpc(grpc, "ModelInfer", grpc_message)
        assert got.code == code
        assert got.message == message

    asyncio.run(run())


def test_a_sticky_key_pins_the_same_variant_on_both_transports():
    async def run():
        plane, http, grpc, _ = await _serving()
        ep = Router.endpoint(plane.router, "t")
        for key in (f"user-{i}" for i in range(12)):
            want = ep.choose(key)  # a weighted split hashes the key: the same variant every time
            by_header = await _http(http, "POST", "/v2/models/t/infer", _infer_body(), flywheel_routing_key=key)
            by_parameter = await _http(http, "POST", "/v2/models/t/infer",
                                       _infer_body(parameters={"routing_key": key}))
            by_metadata = await _grpc(grpc, "ModelInfer", _infer_message("t"), flywheel_routing_key=key)
            by_grpc_parameter = await _grpc(grpc, "ModelInfer", _infer_message(
                "t", parameters={"routing_key": pb.InferParameter(string_param=key)}))
            assert by_header[2]["flywheel-model-version"] == want
            assert by_parameter[2]["flywheel-model-version"] == want
            assert by_metadata[1]["flywheel-model-version"] == want
            assert by_grpc_parameter[1]["flywheel-model-version"] == want

    asyncio.run(run())


def test_a_tracked_request_is_recorded_alike_on_both_transports():
    async def run():
        plane, http, grpc, _ = await _serving()
        ep = plane.router.endpoint("t")
        _, _, extra = await _http(http, "POST", "/v2/models/t/infer", _infer_body(id="from-http"))
        _, trailing = await _grpc(grpc, "ModelInfer", _infer_message("t", id="from-grpc"))
        assert extra["flywheel-request-id"] == "from-http"
        assert trailing["flywheel-request-id"] == "from-grpc"
        assert ep.take_feedback("from-http", 1.0) == extra["flywheel-model-version"]
        assert ep.take_feedback("from-grpc", 1.0) == trailing["flywheel-model-version"]
        assert sum(w.requests for w in ep.windows.values()) == 2

    asyncio.run(run())


def test_an_id_of_ours_is_made_for_a_tracked_request_without_one():
    async def run():
        plane, http, grpc, _ = await _serving()
        ep = plane.router.endpoint("t")
        _, _, extra = await _http(http, "POST", "/v2/models/t/infer", _infer_body())
        _, trailing = await _grpc(grpc, "ModelInfer", _infer_message("t"))
        for rid, version in [(extra["flywheel-request-id"], extra["flywheel-model-version"]),
                             (trailing["flywheel-request-id"], trailing["flywheel-model-version"])]:
            assert len(rid) == 24
            assert ep.take_feedback(rid, 0.5) == version

    asyncio.run(run())


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_the_shadow_variant_gets_a_copy_and_is_compared(transport):
    async def run():
        plane, http, grpc, models = await _serving()
        if transport == "http":
            await _http(http, "POST", "/v2/models/s/infer", _infer_body())
        else:
            await _grpc(grpc, "ModelInfer", _infer_message("s"))
        window = plane.router.endpoint("s").windows
        # the shadow runs after the answer, on the same loop
        await wait_for_async(lambda: "2" in window and window["2"].shadow_compared, 5, "the shadow's comparison",
                             every_s=0.001)
        assert models[("s", "2")].infers == 1
        assert window["2"].shadow_compared == 1
        assert window["2"].shadow_agreed == 1
        assert window["1"].requests == 1

    asyncio.run(run())


def test_server_and_model_metadata_agree_on_both_transports():
    async def run():
        plane, http, grpc, _ = await _serving()
        status, meta, _ = await _http(http, "GET", "/v2/models/t")
        body, _ = await _grpc(grpc, "ModelMetadata", pb.ModelMetadataRequest(name="t"))
        got = pb.ModelMetadataResponse.FromString(body)
        assert status == 200
        assert (got.name, list(got.versions), got.platform) == (meta["name"], meta["versions"], meta["platform"])
        assert meta["versions"] == ["1", "2"]
        assert [(t.name, t.datatype, list(t.shape)) for t in got.inputs] == [
            (t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]]
        _, server, _ = await _http(http, "GET", "/v2")
        body, _ = await _grpc(grpc, "ServerMetadata", pb.ServerMetadataRequest())
        got = pb.ServerMetadataResponse.FromString(body)
        assert (got.name, got.version, list(got.extensions)) == (server["name"], server["version"],
                                                                   server["extensions"])

    asyncio.run(run())


def test_readiness_agrees_on_both_transports():
    async def run():
        plane, http, grpc, _ = await _serving()
        for name, ready in [("m", True), ("late", False)]:
            status, _, _ = await _http(http, "GET", f"/v2/models/{name}/ready")
            body, _ = await _grpc(grpc, "ModelReady", pb.ModelReadyRequest(name=name))
            assert (status == 200) is ready
            assert pb.ModelReadyResponse.FromString(body).ready is ready
        assert plane.log == ["model_ready"] * 4
        status, _, _ = await _http(http, "GET", "/v2/health/ready")  # late is not ready
        body, _ = await _grpc(grpc, "ServerReady", pb.ServerReadyRequest())
        assert status == 503
        assert pb.ServerReadyResponse.FromString(body).ready is False

    asyncio.run(run())


@pytest.mark.parametrize("path, method, message, code, text", [
    ("/v2/models/late", "ModelMetadata", pb.ModelMetadataRequest(name="late"), ErrorCode.UNAVAILABLE,
     "model 'late' is not ready"),
    ("/v2/models/nope", "ModelMetadata", pb.ModelMetadataRequest(name="nope"), ErrorCode.NOT_FOUND,
     "unknown model 'nope'"),
    ("/v2/models/nope/ready", "ModelReady", pb.ModelReadyRequest(name="nope"), ErrorCode.NOT_FOUND,
     "unknown model 'nope'"),
    ("/v2/models/u/ready", "ModelReady", pb.ModelReadyRequest(name="u"), ErrorCode.UNAVAILABLE,
     "endpoint 'u' has no ready variant"),
])
def test_a_metadata_error_is_the_same_error_on_both_transports(path, method, message, code, text):
    async def run():
        _, http, grpc, _ = await _serving()
        assert await _http(http, "GET", path) == (status_for(code), {"error": text}, {})
        got = await _grpc(grpc, method, message)
        assert got.code == code
        assert got.message == text

    asyncio.run(run())


def test_an_unknown_model_is_a_404_before_a_wrong_method_is_a_405():
    async def run():
        _, http, _, _ = await _serving()
        assert (await _http(http, "POST", "/v2/models/nope/ready"))[0] == 404
        assert (await _http(http, "POST", "/v2/models/m/ready"))[0] == 405

    asyncio.run(run())
