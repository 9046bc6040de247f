"""flywheel.client against the real ingress (no Ray), over loopback.

One standalone server per module (`python -m flywheel.bench.standalone`)
serves the session's MLP as model ``mlp`` version 3, on HTTP and gRPC.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import sys
import threading

import numpy as np
import onnxruntime as ort
import pytest

from flywheel.client import AsyncClient, AsyncGrpcClient, Client, ClientError, GrpcClient, InferResult


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(mlp_onnx):
    http_port, grpc_port = _free_port(), _free_port()
    cfg = {"server": {"port": http_port, "grpc_port": grpc_port},
           "models": [{"name": "mlp", "version": "3", "path": mlp_onnx, "batching": {"max_batch_size": 20_000}}]}
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.bench.standalone", json.dumps(cfg)],
                            stdout=subprocess.PIPE, text=True)
    timer = threading.Timer(60, proc.kill)  # a server that never says ready fails the tests, not hangs them
    timer.start()
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        timer.cancel()
    yield {"http": f"http://127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}", "port": http_port}
    proc.terminate()  # SIGTERM: the standalone server stops cleanly
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((4, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def want(mlp_onnx, x) -> np.ndarray:
    return ort.InferenceSession(mlp_onnx, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _check(r: InferResult, want: np.ndarray) -> None:
    assert isinstance(r, InferResult)
    assert r.model_name == "mlp"
    assert r.model_version == "3"
    assert list(r.outputs) == ["logits"]
    got = r.output()
    assert got.dtype == np.float32
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5
    got[0, 0] = 0.0  # outputs are the caller's to change


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_infer_matches_onnxruntime(server, x, want, binary):
    with Client(server["http"]) as c:
        _check(c.infer("mlp", x, binary=binary), want)
        r = c.infer("mlp", {"input": x}, version="3", request_id="req-1", key="user-9", binary=binary,
                    outputs=["logits"])
        _check(r, want)
        assert r.request_id == "req-1"
        assert r.headers["content-length"].isdigit()
        if binary:
            assert "inference-header-content-length" in r.headers


def test_grpc_infer_matches_onnxruntime(server, x, want):
    with GrpcClient(server["grpc"]) as c:
        _check(c.infer("mlp", x), want)
        r = c.infer("mlp", {"input": x}, version="3", request_id="req-2", key="user-9", outputs=["logits"])
        _check(r, want)
        assert r.request_id == "req-2"


def test_async_http_infer_matches_onnxruntime(server, x, want):
    async def main():
        async with AsyncClient(server["http"]) as c:
            results = await asyncio.gather(*(c.infer("mlp", x, request_id=f"a{i}", binary=i % 2 == 0)
                                             for i in range(6)))
            return results, c.sockets_opened

    results, opened = asyncio.run(main())
    for i, r in enumerate(results):
        _check(r, want)
        assert r.request_id == f"a{i}"
    assert 1 <= opened <= 7  # the metadata call, then at most one socket per concurrent call


def test_async_grpc_infer_matches_onnxruntime(server, x, want):
    async def main():
        async with AsyncGrpcClient(server["grpc"]) as c:
            return await asyncio.gather(*(c.infer("mlp", x, request_id=f"g{i}") for i in range(4)))

    for i, r in enumerate(asyncio.run(main())):
        _check(r, want)
        assert r.request_id == f"g{i}"


def _raw_error(port: int, path: str, body: dict) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    status, doc = resp.status, json.loads(resp.read())
    conn.close()
    return status, doc["error"]


def test_bad_input_raises_400_with_the_servers_message(server):
    bad = np.zeros((2, 63), np.float32)
    status, message = _raw_error(server["port"], "/v2/models/mlp/infer", {
        "inputs": [{"name": "input", "shape": [2, 63], "datatype": "FP32", "data": bad.ravel().tolist()}]})
    assert status == 400
    with Client(server["http"]) as c:
        with pytest.raises(ClientError) as err:
            c.infer("mlp", bad, binary=False)  # the same request as the raw one
        assert err.value.status == 400
        assert err.value.message == message
        assert str(err.value) == f"[400] {message}"
        with pytest.raises(ClientError) as err:
            c.infer("mlp", bad, binary=True)
        assert err.value.status == 400
        assert "input" in err.value.message
    with GrpcClient(server["grpc"]) as g, pytest.raises(ClientError) as err:
        g.infer("mlp", bad)
    assert err.value.status == "INVALID_ARGUMENT"
    assert "input" in err.value.message


def test_unknown_model_raises_404(server, x):
    with Client(server["http"]) as c:
        for inputs in (x, {"input": x}):  # via the metadata lookup, and directly
            with pytest.raises(ClientError) as err:
                c.infer("nope", inputs)
            assert err.value.status == 404
            assert "nope" in err.value.message
        with pytest.raises(ClientError) as err:
            c.infer("mlp", x, version="99")
        assert err.value.status == 404
        assert c.model_ready("nope") is False
    with GrpcClient(server["grpc"]) as g:
        with pytest.raises(ClientError) as err:
            g.infer("nope", {"input": x})
        assert err.value.status == "NOT_FOUND"
        assert g.model_ready("nope") is False


def test_sequential_calls_reuse_one_connection(server, x):
    with Client(server["http"]) as c:
        for i in range(50):
            c.infer("mlp", x[:1], binary=i % 2 == 0)
        assert c.sockets_opened == 1

    async def main():
        async with AsyncClient(server["http"]) as c:
            for _ in range(50):
                await c.infer("mlp", x[:1])
            return c.sockets_opened

    assert asyncio.run(main()) == 1


def test_large_batches_travel_both_ways(server, mlp_onnx):
    big = np.random.default_rng(3).standard_normal((20_000, 64)).astype(np.float32)  # 5 MB in, 800 kB out
    want = ort.InferenceSession(mlp_onnx, providers=["CPUExecutionProvider"]).run(None, {"input": big})[0]

    async def main():
        async with AsyncClient(server["http"]) as c:
            return await c.infer("mlp", big)

    with Client(server["http"]) as c:
        for r in (c.infer("mlp", big), c.infer("mlp", big, binary=False), asyncio.run(main())):
            assert np.abs(r.output() - want).max() <= 1e-5


def test_concurrent_threads_share_one_client(server, x, want):
    from concurrent.futures import ThreadPoolExecutor

    with Client(server["http"]) as c, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: c.infer("mlp", x), range(16)))
        assert c.sockets_opened <= 4
    for r in results:
        _check(r, want)


def test_feedback_for_an_id_the_server_never_issued_is_404(server):
    # Feedback travels over HTTP (the gRPC client needs http_url for it); an
    # id no answer carried is refused by name, never counted.
    with Client(server["http"]) as c, pytest.raises(ClientError) as err:
        c.feedback("mlp", "req-1", 1.0)
    assert err.value.status == 404, err.value.message
    assert "'req-1' is unknown" in err.value.message, err.value.message
    with GrpcClient(server["grpc"]) as g:
        with pytest.raises(ClientError) as err:
            g.feedback("mlp", "req-1", 1.0)
        assert err.value.status is None
        assert "http_url" in err.value.message
    with GrpcClient(server["grpc"], http_url=server["http"]) as g, pytest.raises(ClientError) as err:
        g.feedback("mlp", "req-1", 1.0)
    assert err.value.status == 404


def test_health_and_metadata_over_both_transports(server):
    with Client(server["http"]) as c, GrpcClient(server["grpc"]) as g:
        assert c.live()
        assert c.ready()
        assert c.model_ready("mlp")
        assert c.model_ready("mlp", "3")
        assert g.live()
        assert g.ready()
        assert g.model_ready("mlp")
        meta = c.metadata("mlp")
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        assert g.metadata("mlp") == {k: meta[k] for k in ("name", "versions", "platform", "inputs", "outputs")}
        assert "binary_tensor_data" in c.metadata()["extensions"]
        assert g.metadata() == c.metadata()


def test_async_health_and_errors(server):
    async def main():
        async with AsyncClient(server["http"]) as c, AsyncGrpcClient(server["grpc"]) as g:
            assert await c.live()
            assert await c.ready()
            assert await c.model_ready("mlp")
            assert await g.live()
            assert await g.model_ready("mlp")
            assert not await g.model_ready("nope")
            assert (await g.metadata("mlp"))["inputs"][0]["name"] == "input"
            with pytest.raises(ClientError) as err:
                await c.infer("nope", {"input": np.zeros((1, 64), np.float32)})
            assert err.value.status == 404
            with pytest.raises(ClientError) as err:
                await g.infer("mlp", {"input": np.zeros((1, 63), np.float32)})
            assert err.value.status == "INVALID_ARGUMENT"

    asyncio.run(main())


def test_unreachable_server_raises_client_error_without_status():
    with Client(f"http://127.0.0.1:{_free_port()}", timeout=2) as c, pytest.raises(ClientError) as err:
        c.live()
    assert err.value.status is None
    assert "cannot reach" in err.value.message
