"""flywheel.client's protocol layer and its HTTP transports, without a model server.

The protocol flows are driven by hand and checked against the server's own
codec (protocol/codec.py); the transports talk to a tiny loopback HTTP server
that closes connections the way real servers and proxies do.
"""

from __future__ import annotations

import asyncio
import json
import socket
import socketserver
import subprocess
import sys
import threading

import numpy as np
import pytest

from flywheel.client import AsyncClient, Client, ClientError
from flywheel.client._v2 import HttpCall, HttpReply, V2Http
from flywheel.protocol.codec import decode_infer_request, encode_response

META = json.dumps({"name": "m", "inputs": [{"name": "in", "datatype": "FP32", "shape": [-1, 3]}]}).encode()


def _infer(v2: V2Http, inputs, **kw):
    args = dict(version=None, key=None, request_id=None, binary=True, outputs=None, parameters=None, headers=None)
    return v2.infer("m", inputs, **{**args, **kw})


def _answer(outputs, *, binary, model_version="7", request_id=None, headers=None) -> HttpReply:
    body, n = encode_response("m", model_version, outputs, request_id, binary=set(outputs) if binary else set())
    h = {"inference-header-content-length": str(n)} if n else {}
    return HttpReply(200, {**h, **(headers or {})}, body)


def _decode_call(call: HttpCall):
    n = call.headers.get("inference-header-content-length")
    return decode_infer_request(call.body, header_length=int(n) if n else None)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_flow_round_trips_through_the_servers_codec(binary):
    v2 = V2Http("k-1")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    flow = _infer(v2, x, key="user-1", request_id="r-1", binary=binary, parameters={"p": 1})
    meta_call = next(flow)
    assert (meta_call.method, meta_call.path) == ("GET", "/v2/models/m")
    assert meta_call.headers["authorization"] == "Bearer k-1"
    call = flow.send(HttpReply(200, {}, META))
    assert (call.method, call.path) == ("POST", "/v2/models/m/infer")
    h = call.headers
    assert h["flywheel-routing-key"] == "user-1"
    assert h["flywheel-request-id"] == "r-1"
    assert h["authorization"] == "Bearer k-1"
    assert ("inference-header-content-length" in h) == binary
    req = _decode_call(call)
    assert req.id == "r-1"
    assert list(req.inputs) == ["in"]
    assert np.array_equal(req.inputs["in"], x)
    assert req.inputs["in"].dtype == np.float32
    assert req.binary_outputs(["out"]) == (frozenset({"out"}) if binary else frozenset())
    y = {"out": np.array([[1.5, -2.0]], np.float32), "label": np.array([b"cat", b"dog"], dtype=object)}
    with pytest.raises(StopIteration) as done:
        flow.send(_answer(y, binary=binary, request_id="r-1"))
    r = done.value.value
    assert r.model_version == "7"
    assert r.request_id == "r-1"
    assert np.array_equal(r.output("out"), y["out"])
    assert r.output("out").flags.writeable
    assert list(r.output("label")) == [b"cat", b"dog"]
    # the input's name is cached: the next call goes straight to infer
    assert next(_infer(v2, x)).path == "/v2/models/m/infer"


@pytest.mark.parametrize("dtype", ["bool", "uint8", "int16", "int64", "float16", "float64", "bytes"])
def test_every_datatype_encodes_as_the_server_decodes_it(dtype):
    if dtype == "bytes":
        arr = np.array([[b"a", b"bc"], [b"", b"def"]], dtype=object)
    else:
        arr = (np.arange(4) % 2 == 1 if dtype == "bool" else np.arange(4)).astype(dtype).reshape(2, 2)
    for binary in (True, False):
        call = next(_infer(V2Http(None), {"t": arr}, binary=binary))
        assert "authorization" not in call.headers
        got = _decode_call(call).inputs["t"]
        assert got.shape == arr.shape
        assert list(got.ravel()) == list(arr.ravel())


def test_answer_headers_fill_in_version_and_id_and_errors_drop_the_cache():
    v2 = V2Http(None)
    flow = _infer(v2, np.zeros((1, 3), np.float32))
    next(flow)
    flow.send(HttpReply(200, {}, META))
    with pytest.raises(StopIteration) as done:
        flow.send(_answer({"out": np.zeros(1, np.float32)}, binary=False, model_version=None,
                          headers={"flywheel-model-version": "canary-2", "flywheel-request-id": "srv-1"}))
    r = done.value.value
    assert r.model_version == "canary-2"
    assert r.request_id == "srv-1"
    flow = _infer(v2, np.zeros((1, 3), np.float32))
    next(flow)  # cached: straight to infer
    with pytest.raises(ClientError) as err:
        flow.send(HttpReply(400, {}, b'{"error": "input \'in\': bad"}'))
    assert (err.value.status, err.value.message) == (400, "input 'in': bad")
    assert next(_infer(v2, np.zeros((1, 3), np.float32))).path == "/v2/models/m"  # asks again


def test_single_array_for_a_model_with_several_inputs_is_refused():
    flow = _infer(V2Http(None), np.zeros(3))
    next(flow)
    two = json.dumps({"inputs": [{"name": "a"}, {"name": "b"}]}).encode()
    with pytest.raises(ValueError, match="pass a dict"):
        flow.send(HttpReply(200, {}, two))


def test_import_is_light():
    code = ("import sys, flywheel.client; "
            "print(sorted(m for m in ('ray', 'grpc', 'torch', 'onnxruntime', 'flywheel.serving') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _Stub(socketserver.ThreadingTCPServer):
    """Answers every request with server metadata; ``mode`` says how it ends
    connections: "header" (``connection: close``), "silent" (closes after
    each answer without saying so) or "keep"."""

    daemon_threads = allow_reuse_address = True

    def __init__(self, mode: str) -> None:
        self.mode, self.accepted = mode, 0
        super().__init__(("127.0.0.1", 0), _StubHandler)


class _StubHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.server.accepted += 1
        while True:
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = self.rfile.readline()
                if not line:
                    return
                head += line
            length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n")
                           if h.lower().startswith(b"content-length:")), 0)
            self.rfile.read(length)
            body = b'{"name": "stub", "version": "1", "extensions": []}'
            close = b"connection: close\r\n" if self.server.mode == "header" else b""
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), close, body))
            self.wfile.flush()
            if self.server.mode != "keep":
                self.connection.shutdown(socket.SHUT_RDWR)
                return


@pytest.fixture(params=["header", "silent", "keep"])
def stub(request):
    server = _Stub(request.param)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_clients_reconnect_when_the_server_closes(stub):
    url = f"http://127.0.0.1:{stub.server_address[1]}"
    want = 1 if stub.mode == "keep" else 3
    with Client(url) as c:
        assert [c.metadata()["name"] for _ in range(3)] == ["stub"] * 3
        assert c.sockets_opened == want

    async def main():
        async with AsyncClient(url) as c:
            names = [(await c.metadata())["name"] for _ in range(3)]
            return names, c.sockets_opened

    assert asyncio.run(main()) == (["stub"] * 3, want)


MANAGEMENT = [  # (method name, args, HTTP method, path, JSON body)
    ("endpoints", (), "GET", "/v2/endpoints", None),
    ("endpoint", ("digits",), "GET", "/v2/endpoints/digits", None),
    ("set_policy", ("digits", {"kind": "bandit"}), "PUT", "/v2/endpoints/digits/policy", {"kind": "bandit"}),
    ("add_variant", ("digits", {"version": "2"}), "POST", "/v2/endpoints/digits/variants", {"version": "2"}),
    ("remove_variant", ("digits", "2"), "DELETE", "/v2/endpoints/digits/variants/2", None),
    ("swap", ("digits", {"version": "3"}), "POST", "/v2/endpoints/digits/swap", {"version": "3"}),
    ("start_canary", ("digits", {"version": "3"}), "POST", "/v2/endpoints/digits/canary", {"version": "3"}),
    ("abort_canary", ("digits",), "DELETE", "/v2/endpoints/digits/canary", None),
    ("promote", ("digits", "3"), "POST", "/v2/endpoints/digits/promote", {"version": "3"}),
    ("rollback", ("digits",), "POST", "/v2/endpoints/digits/rollback", None),
    ("set_shadow", ("digits", {"version": "4"}), "PUT", "/v2/endpoints/digits/shadow", {"version": "4"}),
    ("clear_shadow", ("digits",), "DELETE", "/v2/endpoints/digits/shadow", None),
    ("feedback", ("digits", "r-1", 1), "POST", "/v2/models/digits/feedback", {"id": "r-1", "reward": 1.0}),
    ("metadata", ("a b", "v/1"), "GET", "/v2/models/a%20b/versions/v%2F1", None),
]


@pytest.mark.parametrize("method,args,verb,path,body", MANAGEMENT, ids=[m[0] for m in MANAGEMENT])
def test_management_calls_send_the_documented_requests(method, args, verb, path, body):
    seen = []

    def record(call):
        seen.append(call)
        return HttpReply(200, {}, b'{"ok": true}')

    async def arecord(call):
        return record(call)

    c, ac = Client("http://h:1/prefix", api_key="k"), AsyncClient("http://h:1/prefix", api_key="k")
    c._send, ac._send = record, arecord
    assert getattr(c, method)(*args) == {"ok": True}
    assert asyncio.run(getattr(ac, method)(*args)) == {"ok": True}
    for call in seen:
        assert (call.method, call.path) == (verb, path)  # the transport adds the prefix
        assert call.headers["authorization"] == "Bearer k"
        assert (json.loads(call.body) if call.body else None) == body


def test_error_answers_carry_status_and_message():
    c = Client("127.0.0.1:1")
    c._send = lambda call: HttpReply(409, {}, b'{"error": "a canary is already running"}')
    with pytest.raises(ClientError) as err:
        c.start_canary("digits", {})
    assert (err.value.status, err.value.message) == (409, "a canary is already running")
    assert str(err.value) == "[409] a canary is already running"
    c._send = lambda call: HttpReply(502, {}, b"<html>bad gateway</html>")
    with pytest.raises(ClientError) as err:
        c.endpoints()
    assert (err.value.status, err.value.message) == (502, "<html>bad gateway</html>")
