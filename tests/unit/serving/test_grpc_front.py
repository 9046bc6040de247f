"""gRPC through the HAProxy HTTP/2 front (serving/_private/grpc_front.py),
without Ray: a real Ingress in this process (its HAProxy a real child
process), real gRPC clients over loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import psutil
import pytest
import tritonclient.grpc as tg

from flywheel.runtime.errors import ConfigError
from flywheel.serving._private.grpc_front import HaproxyFront, _percent, _timeout, haproxy_binary
from flywheel.serving._private.proto import inference_pb2 as pb
from flywheel.runtime.batcher import BatchingConfig
from flywheel.serving.config import ModelConfig, ServerConfig
from flywheel.serving.ingress import Ingress

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
def served(mlp_onnx):
    ingress, cfg = _ingress(mlp_onnx)
    yield f"127.0.0.1:{cfg.grpc_port}"
    ingress.close()


def _request(x: np.ndarray, model: str = "mlp", rid: str = "") -> bytes:
    r = pb.ModelInferRequest(model_name=model, id=rid)
    r.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    r.raw_input_contents.append(x.tobytes())
    return r.SerializeToString()


def test_timeout_and_message_encodings():
    assert _timeout(b"250m") == pytest.approx(0.25) and _timeout(b"5S") == 5.0 and _timeout(b"2H") == 7200.0
    assert _timeout(b"100u") == pytest.approx(1e-4)
    assert _timeout(None) is None and _timeout(b"5x") is None and _timeout(b"m") is None
    assert _timeout(b"1234567890S") is None  # the spec allows at most 8 digits
    assert _percent("unknown model 'm'") == b"unknown model 'm'"
    assert _percent("50% of 'ä'\n") == b"50%25 of '%C3%A4'%0A"


def test_the_front_is_a_child_haproxy_serving_the_port(served):
    assert haproxy_binary() is not None
    assert len(_fronts()) == 1
    assert tg.InferenceServerClient(served).is_server_live()


def test_infer_through_the_front_matches_onnxruntime_with_trailers(served, mlp_onnx):
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    with grpc.insecure_channel(served) as ch:
        raw, call = ch.unary_unary(INFER).with_call(_request(x, rid="call-7"), timeout=10)
    resp = pb.ModelInferResponse.FromString(raw)
    assert resp.model_name == "mlp" and resp.model_version == "3" and resp.id == "call-7"
    got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(resp.outputs[0].shape)
    want = ort.InferenceSession(mlp_onnx).run(None, {"input": x})[0]
    assert np.abs(got - want).max() <= 1e-5
    assert call.code() == grpc.StatusCode.OK
    assert ("flywheel-model-version", "3") in tuple(call.trailing_metadata())


def test_tritonclient_metadata_and_readiness(served):
    c = tg.InferenceServerClient(served)
    assert c.is_server_ready() and c.is_model_ready("mlp")
    meta = c.get_model_metadata("mlp", as_json=True)
    assert meta["versions"] == ["3"] and meta["inputs"][0]["shape"] == ["-1", "64"]
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
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "no method" in err.value.details()


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
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in err.value.details()
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


def test_close_stops_the_front_and_frees_the_port(mlp_onnx):
    before = {p.pid for p in _fronts()}
    ingress, cfg = _ingress(mlp_onnx)
    [front] = [p for p in _fronts() if p.pid not in before]
    assert tg.InferenceServerClient(f"127.0.0.1:{cfg.grpc_port}").is_server_live()
    ingress.check_health()
    ingress.close()
    assert not front.is_running() or front.status() == psutil.STATUS_ZOMBIE
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", cfg.grpc_port)) != 0


def test_a_dead_front_fails_the_health_check(mlp_onnx):
    before = {p.pid for p in _fronts()}
    ingress, _ = _ingress(mlp_onnx)
    try:
        [front] = [p for p in _fronts() if p.pid not in before]
        front.kill()
        front.wait(5)
        with pytest.raises(RuntimeError, match="gRPC front"):
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
        deadline = time.monotonic() + 5
        while front.is_running() and front.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not front.is_running() or front.status() == psutil.STATUS_ZOMBIE
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", grpc_port)) != 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_port_the_front_cannot_bind_fails_with_haproxys_words():
    with socket.socket() as holder:  # no SO_REUSEPORT: nobody may join it
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        front = HaproxyFront(haproxy_binary(), "127.0.0.1", holder.getsockname()[1])
        with pytest.raises(OSError, match="could not serve .*[Bb]ind"):
            front.start(timeout_s=5)
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


def test_haproxy_demanded_but_missing_is_a_config_error(mlp_onnx, monkeypatch):
    import flywheel.serving.ingress as ingress_module

    monkeypatch.setattr(ingress_module, "haproxy_binary", lambda: None)
    with pytest.raises(ConfigError, match="no HAProxy binary"):
        _ingress(mlp_onnx, grpc_server="haproxy")


def test_grpc_server_setting_is_validated():
    with pytest.raises(ConfigError, match="grpc_server"):
        ServerConfig(grpc_server="nginx")
