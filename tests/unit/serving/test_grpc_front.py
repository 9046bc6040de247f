"""gRPC through the HAProxy HTTP/2 front (serving/_private/grpc_front.py),
without Ray: a real Ingress in this process (its HAProxy a real child
process), real gRPC clients over loopback."""

from __future__ import annotations

import asyncio
import glob
import gzip
import json
import os
import zlib
import signal
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import psutil
import pytest
import tritonclient.grpc as tg

from flywheel.protocol.errors import ConfigError
from flywheel.serving._private.grpc_front import HaproxyFront, _percent, _timeout, haproxy_binary
from flywheel.protocol.proto import inference_pb2 as pb
from flywheel.runtime.batcher import BatchingConfig
from flywheel.serving.config import ModelConfig, ServerConfig
from flywheel.serving.ingress import Ingress

from _poll import wait_for

INFER = "/inference.GRPCInferenceService/ModelInfer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ingress(mlp_onnx, **server) -> tuple[Ingress, ServerConfig]:
    cfg = ServerConfig(port=free_port(), grpc_port=free_port(), max_body_bytes=100_000, **server)
    model = ModelConfig(name="mlp", version="3", path=mlp_onnx, batching=BatchingConfig(max_batch_size=16))
    return Ingress(cfg, [], colocated=[model]), cfg


def _fronts() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if "haproxy" in p.name()]


@pytest.fixture(scope="module")
def front_ingress(mlp_onnx):
    ingress, cfg = _ingress(mlp_onnx)
    yield ingress, f"127.0.0.1:{cfg.grpc_port}"
    ingress.close()


@pytest.fixture(scope="module")
def served(front_ingress) -> str:
    return front_ingress[1]


def _request(x: np.ndarray, model: str = "mlp", rid: str = "") -> bytes:
    r = pb.ModelInferRequest(model_name=model, id=rid)
    r.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    r.raw_input_contents.append(x.tobytes())
    return r.SerializeToString()


def test_timeout_and_message_encodings():
    assert _timeout(b"250m") == pytest.approx(0.25)
    assert _timeout(b"5S") == 5.0
    assert _timeout(b"2H") == 7200.0
    assert _timeout(b"100u") == pytest.approx(1e-4)
    assert _timeout(None) is None
    assert _timeout(b"5x") is None
    assert _timeout(b"m") is None
    assert _timeout(b"1234567890S") is None  # the spec allows at most 8 digits
    assert _percent("unknown model 'm'") == b"unknown model 'm'"
    assert _percent("50% of 'ä'\n") == b"50%25 of '%C3%A4'%0A"


def test_the_front_is_a_child_haproxy_serving_the_port(front_ingress):
    ingress, target = front_ingress
    assert haproxy_binary() is not None
    assert ingress._front._proc.pid in {p.pid for p in _fronts()}
    assert tg.InferenceServerClient(target).is_server_live()


def test_infer_through_the_front_matches_onnxruntime_with_trailers(served, mlp_onnx):
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    with grpc.insecure_channel(served) as ch:
        raw, call = ch.unary_unary(INFER).with_call(_request(x, rid="call-7"), timeout=10)
    resp = pb.ModelInferResponse.FromString(raw)
    assert resp.model_name == "mlp"
    assert resp.model_version == "3"
    assert resp.id == "call-7"
    got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(resp.outputs[0].shape)
    want = ort.InferenceSession(mlp_onnx).run(None, {"input": x})[0]
    assert np.abs(got - want).max() <= 1e-5
    assert call.code() == grpc.StatusCode.OK
    assert ("flywheel-model-version", "3") in tuple(call.trailing_metadata())


def test_tritonclient_metadata_and_readiness(served):
    c = tg.InferenceServerClient(served)
    assert c.is_server_ready()
    assert c.is_model_ready("mlp")
    meta = c.get_model_metadata("mlp", as_json=True)
    assert meta["versions"] == ["3"]
    assert meta["inputs"][0]["shape"] == ["-1", "64"]
    assert c.get_server_metadata(as_json=True)["name"] == "flywheel"


def test_gzip_compressed_requests_are_inflated(served, mlp_onnx):
    x = np.ones((2, 64), np.float32)
    with grpc.insecure_channel(served, compression=grpc.Compression.Gzip) as ch:
        raw = ch.unary_unary(INFER)(_request(x), timeout=10)
    got = np.frombuffer(pb.ModelInferResponse.FromString(raw).raw_output_contents[0], np.float32)
    assert np.allclose(got.reshape(2, 10), ort.InferenceSession(mlp_onnx).run(None, {"input": x})[0], atol=1e-5)


@pytest.mark.parametrize("method", ["/inference.GRPCInferenceService/ModelConfig", "/other.Service/ModelInfer"])
def test_unknown_methods_are_unimplemented(served, method):
    with grpc.insecure_channel(served) as ch, pytest.raises(grpc.RpcError) as err:
        ch.unary_unary(method)(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "no method" in err.value.details()


def test_errors_keep_their_status_and_a_non_ascii_message(served):
    with grpc.insecure_channel(served) as ch, pytest.raises(grpc.RpcError) as err:
        ch.unary_unary(INFER)(_request(np.zeros((1, 64), np.float32), model="mödel-ß"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown model 'mödel-ß'" in err.value.details()


def test_a_message_over_the_limit_is_resource_exhausted_and_the_front_goes_on(served):
    big = np.zeros((400, 64), np.float32)  # 102 KB > max_body_bytes
    with grpc.insecure_channel(served) as ch:
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(INFER)(_request(big), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit" in err.value.details()
        raw = ch.unary_unary(INFER)(_request(np.zeros((1, 64), np.float32)), timeout=10)
    assert pb.ModelInferResponse.FromString(raw).model_version == "3"


def test_many_concurrent_calls_on_one_connection_each_get_their_own_answer(served, mlp_onnx):
    xs = [np.full((1, 64), i / 10, np.float32) for i in range(200)]
    sess = ort.InferenceSession(mlp_onnx)
    with grpc.insecure_channel(served) as ch, ThreadPoolExecutor(16) as pool:
        stub = ch.unary_unary(INFER)
        answers = list(pool.map(lambda x: stub(_request(x, rid=str(x[0, 0])), timeout=10), xs))
    for x, raw in zip(xs, answers):
        resp = pb.ModelInferResponse.FromString(raw)
        assert resp.id == str(x[0, 0])
        got = np.frombuffer(resp.raw_output_contents[0], np.float32)
        assert np.allclose(got, sess.run(None, {"input": x})[0].ravel(), atol=1e-5)


def test_close_stops_the_front_gracefully_and_frees_the_port(mlp_onnx):
    ingress, cfg = _ingress(mlp_onnx)
    front = ingress._front
    proc, folder = front._proc, os.path.dirname(front.backend)
    client = tg.InferenceServerClient(f"127.0.0.1:{cfg.grpc_port}")
    assert client.is_server_live()  # an open client connection: soft stop must end it
    ingress.check_health()
    assert front.stop() == 0  # SIGUSR1: it unbound and left by itself, no kill needed
    assert proc.poll() == 0
    assert not os.path.exists(folder)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", cfg.grpc_port)) != 0
    ingress.close()


def test_a_dead_front_fails_the_health_check_with_its_status(mlp_onnx):
    ingress, _ = _ingress(mlp_onnx)
    try:
        ingress._front._proc.kill()
        ingress._front._proc.wait(5)
        with pytest.raises(RuntimeError, match="gRPC front .* exited with status -9"):
            ingress.check_health()
    finally:
        ingress.close()


def test_the_front_dies_with_its_replica_process(mlp_onnx):
    """SIGKILL the process that serves: its HAProxy must not outlive it
    (it would keep accepting calls on the shared port for nobody)."""
    grpc_port = free_port()
    cfg = {"server": {"port": free_port(), "grpc_port": grpc_port},
           "models": [{"name": "mlp", "path": mlp_onnx}]}
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.bench.standalone", json.dumps(cfg)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        [front] = [p for p in psutil.Process(proc.pid).children() if "haproxy" in p.name()]
        assert tg.InferenceServerClient(f"127.0.0.1:{grpc_port}").is_server_live()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: not front.is_running() or front.status() == psutil.STATUS_ZOMBIE, 5,
                 "its HAProxy front to exit with it", every_s=0.05)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", grpc_port)) != 0
        # nobody was left to remove its folder: the next front sweeps it
        [left] = glob.glob(os.path.join(tempfile.gettempdir(), f"flywheel-grpc-{proc.pid}-*"))
        HaproxyFront(haproxy_binary(), "127.0.0.1", 0).stop()
        assert not os.path.exists(left)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_port_the_front_cannot_bind_fails_with_haproxys_words():
    with socket.socket() as holder:  # no SO_REUSEPORT: nobody may join it
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        front = HaproxyFront(haproxy_binary(), "127.0.0.1", holder.getsockname()[1])
        with pytest.raises(OSError, match="could not serve .*[Bb]ind"):
            asyncio.run(front.start(timeout_s=5))
    assert not os.path.exists(os.path.dirname(front.backend))


def test_grpcio_still_serves_when_chosen(mlp_onnx):
    before = {p.pid for p in _fronts()}
    ingress, cfg = _ingress(mlp_onnx, grpc_server="grpcio")
    try:
        assert {p.pid for p in _fronts()} == before  # no HAProxy for this one
        with grpc.insecure_channel(f"127.0.0.1:{cfg.grpc_port}") as ch:
            raw, call = ch.unary_unary(INFER).with_call(_request(np.zeros((1, 64), np.float32)), timeout=10)
        assert pb.ModelInferResponse.FromString(raw).model_version == "3"
        assert ("flywheel-model-version", "3") in tuple(call.trailing_metadata())
    finally:
        ingress.close()


def test_auto_falls_back_to_grpcio_when_the_front_cannot_start(mlp_onnx, monkeypatch):
    import flywheel.serving.ingress as ingress_module

    monkeypatch.setattr(ingress_module, "haproxy_binary", lambda: "/bin/false")  # exits at once
    ingress, cfg = _ingress(mlp_onnx)
    try:
        assert ingress._front is None
        assert ingress._grpc is not None
        assert tg.InferenceServerClient(f"127.0.0.1:{cfg.grpc_port}").is_model_ready("mlp")
    finally:
        ingress.close()
    with pytest.raises(OSError, match="gRPC front"):
        _ingress(mlp_onnx, grpc_server="haproxy")


def test_haproxy_demanded_but_missing_is_a_config_error(mlp_onnx, monkeypatch):
    import flywheel.serving.ingress as ingress_module

    monkeypatch.setattr(ingress_module, "haproxy_binary", lambda: None)
    with pytest.raises(ConfigError, match="no HAProxy binary"):
        _ingress(mlp_onnx, grpc_server="haproxy")


def test_grpc_server_setting_is_validated():
    with pytest.raises(ConfigError, match="grpc_server"):
        ServerConfig(grpc_server="nginx")


# -- what the replica answers HAProxy, over its Unix socket -------------------

def _raw(backend: str, body: bytes, headers: dict[str, str], path: str = INFER):
    """One HTTP/1.1 call on the front's socket: (status, headers, body, trailers)."""
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n")
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(backend)
        s.sendall(head.encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    top, _, rest = data.partition(b"\r\n\r\n")
    lines = top.decode().split("\r\n")
    hdrs = dict(line.split(": ", 1) for line in lines[1:])
    if hdrs.get("transfer-encoding") != "chunked":
        return int(lines[0].split()[1]), hdrs, rest, {}
    size_line, _, rest = rest.partition(b"\r\n")
    payload, rest = rest[: int(size_line, 16)], rest[int(size_line, 16):]
    if payload:
        rest = rest[2:].partition(b"\r\n")[2]  # CRLF after the chunk, then the last-chunk line
    trailers = dict(line.split(": ", 1) for line in rest.decode().split("\r\n") if line)
    return int(lines[0].split()[1]), hdrs, payload, trailers


def _framed(message: bytes, compressed: bool = False) -> bytes:
    return bytes((int(compressed),)) + len(message).to_bytes(4, "big") + message


GRPC_HEADERS = {"content-type": "application/grpc", "te": "trailers"}


def test_the_replica_answers_a_call_as_chunked_http1_with_trailers(front_ingress):
    backend = front_ingress[0]._front.backend
    status, hdrs, payload, trailers = _raw(backend, _framed(_request(np.zeros((1, 64), np.float32), rid="r1")),
                                           GRPC_HEADERS)
    assert status == 200
    assert hdrs["content-type"] == "application/grpc"
    assert trailers["grpc-status"] == "0"
    assert trailers["flywheel-model-version"] == "3"
    assert int.from_bytes(payload[1:5], "big") == len(payload) - 5
    assert pb.ModelInferResponse.FromString(payload[5:]).id == "r1"


def test_deflate_is_inflated_and_broken_compression_is_refused(front_ingress):
    backend = front_ingress[0]._front.backend
    message = _request(np.zeros((1, 64), np.float32))
    ok = _raw(backend, _framed(zlib.compress(message), True), {**GRPC_HEADERS, "grpc-encoding": "deflate"})
    assert ok[3]["grpc-status"] == "0"
    assert pb.ModelInferResponse.FromString(ok[2][5:]).model_name == "mlp"
    truncated = gzip.compress(message)[:-4]  # the CRC and length are gone
    cases = [
        (_framed(truncated, True), {"grpc-encoding": "gzip"}, "13", "truncated"),
        (_framed(gzip.compress(message) + b"junk", True), {"grpc-encoding": "gzip"}, "13", "bytes after its end"),
        (_framed(message, True), {}, "13", "names none"),
        (_framed(message, True), {"grpc-encoding": "snappy"}, "12", "'snappy' is not supported"),
        (_framed(message)[:-1], {}, "13", "exactly one length-prefixed"),
        (_framed(message) + _framed(message), {}, "13", "exactly one length-prefixed"),
    ]
    for body, extra, code, words in cases:
        status, hdrs, _, trailers = _raw(backend, body, {**GRPC_HEADERS, **extra})
        assert (status, trailers["grpc-status"]) == (200, code), (words, trailers)
        assert words in trailers["grpc-message"].replace("%27", "'"), trailers
    assert "gzip" in _raw(backend, _framed(message, True), {**GRPC_HEADERS, "grpc-encoding": "br"})[1][
        "grpc-accept-encoding"]


def test_a_plain_http_request_on_the_front_socket_is_refused(front_ingress):
    status, _, body, _ = _raw(front_ingress[0]._front.backend, b"{}", {"content-type": "application/json"})
    assert status == 415
    assert b"application/grpc" in body


# -- auth and per-key limits, on both gRPC servers ----------------------------

@pytest.fixture(scope="module", params=["haproxy", "grpcio"])
def secured(request, mlp_onnx, tmp_path_factory):
    import torch

    from flywheel.registry.keys import KeyStore
    from flywheel.runtime.architectures import build
    from flywheel.runtime.export import export_onnx
    from flywheel.serving.config import AuthConfig

    home = tmp_path_factory.mktemp("front-auth")
    torch.manual_seed(0)
    module, sig = build("mlp", {"in_features": 64, "hidden": [2048, 2048], "out_features": 10})
    heavy = export_onnx(module, sig, str(home / "heavy.onnx"))
    uri = f"sqlite:///{home}/registry.db"
    keys = KeyStore.open(uri)
    _, token = keys.create("one-at-a-time", ["predict"], actor="tests")
    keys.close()
    cfg = ServerConfig(port=free_port(), grpc_port=free_port(), max_body_bytes=16 << 20,
                       grpc_server=request.param,
                       auth=AuthConfig(enabled=True, max_concurrent_per_key=1))
    models = [ModelConfig(name="mlp", version="1", path=mlp_onnx),
              ModelConfig(name="heavy", version="1", path=heavy, batching=BatchingConfig(max_batch_size=40_000))]
    ingress = Ingress(cfg, [], keys_uri=uri, colocated=models)
    yield f"127.0.0.1:{cfg.grpc_port}", token
    ingress.close()


def test_grpc_calls_need_a_key_on_either_server(secured):
    target, token = secured
    x = np.zeros((1, 64), np.float32)
    with grpc.insecure_channel(target) as ch:
        stub = ch.unary_unary(INFER)
        for meta in ((), (("authorization", "Bearer junk"),)):
            with pytest.raises(grpc.RpcError) as err:
                stub(_request(x), metadata=meta, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        raw = stub(_request(x), metadata=(("authorization", f"Bearer {token}"),), timeout=10)
        live = ch.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=10)  # no key needed
    assert pb.ModelInferResponse.FromString(raw).model_name == "mlp"
    assert pb.ServerLiveResponse.FromString(live).live


def test_a_cancelled_call_gives_its_keys_slot_back_at_once(secured):
    """Limit 1 per key: a call the client gives up on (its deadline) must
    free the slot when it is cancelled, not when the model finishes."""
    target, token = secured
    meta = (("authorization", f"Bearer {token}"),)
    slow = _request(np.zeros((30_000, 64), np.float32), model="heavy")  # seconds of work here
    with grpc.insecure_channel(target) as ch:
        stub = ch.unary_unary(INFER)
        with pytest.raises(grpc.RpcError) as err:
            stub(slow, metadata=meta, timeout=0.4)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        def answered() -> bytes | None:
            try:
                return stub(_request(np.zeros((1, 64), np.float32)), metadata=meta, timeout=30)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                return None  # the cancel is still on its way client -> front -> replica

        # 0.3 s for the cancel to travel: far less than the heavy call's seconds of work
        raw = wait_for(answered, 0.3, "the key's slot to be given back", every_s=0.02)
    assert pb.ModelInferResponse.FromString(raw).model_name == "mlp"


def test_the_front_closes_slow_and_idle_grpc_connections_by_the_server_timeouts(mlp_onnx):
    """The HTTP port's header_timeout_s and keepalive_timeout_s bound the
    gRPC port too: a connection that never sends a call's headers, and one
    left idle after a call, are closed by HAProxy; calls still answer."""
    ingress, cfg = _ingress(mlp_onnx, header_timeout_s=1.0, keepalive_timeout_s=1.5)
    try:
        silent = socket.create_connection(("127.0.0.1", cfg.grpc_port))
        silent.settimeout(15)
        half = socket.create_connection(("127.0.0.1", cfg.grpc_port))
        half.settimeout(15)
        half.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # the preface, then never a call
        with grpc.insecure_channel(f"127.0.0.1:{cfg.grpc_port}") as ch:
            raw, _ = ch.unary_unary(INFER).with_call(_request(np.zeros((1, 64), np.float32)), timeout=10)
        assert pb.ModelInferResponse.FromString(raw).model_version == "3"
        for conn in (silent, half):
            try:
                while conn.recv(65536):  # HAProxy may say GOAWAY first; then it closes
                    pass
            except ConnectionResetError:
                pass
            conn.close()
        # an idle channel reconnects by itself: calls keep working
        with grpc.insecure_channel(f"127.0.0.1:{cfg.grpc_port}") as ch:
            raw, _ = ch.unary_unary(INFER).with_call(_request(np.zeros((1, 64), np.float32)), timeout=10)
        assert pb.ModelInferResponse.FromString(raw).model_version == "3"
    finally:
        ingress.close()


def test_the_front_config_carries_the_server_timeouts():
    from flywheel.serving._private.grpc_front import FrontTimeouts, front_config

    text = front_config("127.0.0.1", 9000, "/tmp/x.sock", FrontTimeouts(request_s=2.5, keep_alive_s=60))
    assert "timeout http-request 2500ms" in text
    assert "timeout http-keep-alive 60000ms" in text


def test_the_front_sends_goaway_after_the_calls_that_stand_for_the_connection_age(mlp_onnx):
    """HAProxy has no connection age: with server.max_connection_age_s (or
    autoscaling) a connection gets a graceful GOAWAY after calls_for_age
    calls, and the client reconnects (a new local port) with no call failing."""
    from flywheel.serving._private.grpc_front import MIN_CALLS, calls_for_age, front_config

    assert calls_for_age(None) == 0 and calls_for_age(0.01) == MIN_CALLS and calls_for_age(2) == 2000
    assert "max-total-streams" not in front_config("127.0.0.1", 9000, "/tmp/x.sock")
    ingress, cfg = _ingress(mlp_onnx, max_connection_age_s=0.1)  # 100 calls a connection
    try:
        ports = set()
        me = psutil.Process()
        with grpc.insecure_channel(f"127.0.0.1:{cfg.grpc_port}") as ch:
            call = ch.unary_unary(INFER)
            for i in range(450):
                raw = call(_request(np.zeros((1, 64), np.float32)), timeout=10)
                assert pb.ModelInferResponse.FromString(raw).model_version == "3"
                if i % 10 == 0:
                    ports |= {c.laddr.port for c in me.net_connections("tcp")
                              if c.raddr and c.raddr.port == cfg.grpc_port}
        assert len(ports) >= 3, ports  # 450 calls at 100 a connection: 5 connections
    finally:
        ingress.close()
