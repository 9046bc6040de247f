"""server.tls: HTTPS and gRPC over TLS on the ingress, with a CA made for the
test, called by tritonclient (ssl=True) and Flywheel's Python clients; mutual
TLS refuses a client without a certificate from the configured CA."""

from __future__ import annotations

import http.client
import ssl

import numpy as np
import pytest

from flywheel.client import Client, ClientError, GrpcClient
from flywheel.serving import parse_config
from flywheel.serving.app import deploy, undeploy

from _certs import make_pki

pytestmark = pytest.mark.integration

X = np.linspace(0, 1, 2 * 64, dtype=np.float32).reshape(2, 64)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _deploy(name: str, mlp_onnx: str, tls: dict, grpc_server: str = "auto"):
    cfg = parse_config({"name": name,
                        "server": {"port": 0, "grpc_port": 0, "grpc_server": grpc_server, "tls": tls},
                        "models": [{"name": "mlp", "path": mlp_onnx, "num_cpus": 0.1}]})
    return deploy(cfg)


def _ports(dep) -> tuple[int, int]:
    return int(dep.url.rsplit(":", 1)[1]), int(dep.grpc_target.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def served(ray_session, mlp_onnx, pki):
    """TLS on both ports, gRPC on grpcio (the other gRPC server)."""
    dep = _deploy("tls", mlp_onnx, {"cert_file": pki.server_cert, "key_file": pki.server_key}, grpc_server="grpcio")
    yield dep
    undeploy(dep)


@pytest.fixture(scope="module")
def mutual(ray_session, mlp_onnx, pki):
    """Mutual TLS, gRPC through the HAProxy front."""
    dep = _deploy("mtls", mlp_onnx, {"cert_file": pki.server_cert, "key_file": pki.server_key,
                                     "client_ca_file": pki.ca})
    yield dep
    undeploy(dep)


def _triton_http(port: int, ca: str, cert: str | None = None, key: str | None = None):
    import tritonclient.http as httpclient

    def context() -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=ca)
        if cert:
            ctx.load_cert_chain(cert, key)
        return ctx

    return httpclient, httpclient.InferenceServerClient(f"localhost:{port}", ssl=True,
                                                        ssl_context_factory=context)


def _triton_infer(module, client):
    inp = module.InferInput("input", [2, 64], "FP32")
    inp.set_data_from_numpy(X)
    return client.infer("mlp", [inp]).as_numpy("logits")


def _listener(port: int) -> str:
    """The name of the process that listens on ``port``."""
    import psutil

    for proc in psutil.process_iter(["name"]):
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in proc.net_connections("tcp")):
                return proc.info["name"]
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    return ""


def test_https_and_grpc_over_tls_answer_tritonclient(served, pki):
    import tritonclient.grpc as grpcclient

    port, grpc_port = _ports(served)
    assert served.url.startswith("https://")
    httpclient, client = _triton_http(port, pki.ca)
    by_http = _triton_infer(httpclient, client)
    client.close()
    gclient = grpcclient.InferenceServerClient(f"localhost:{grpc_port}", ssl=True, root_certificates=pki.ca)
    by_grpc = _triton_infer(grpcclient, gclient)
    gclient.close()
    assert by_http.shape == (2, 10)
    np.testing.assert_allclose(by_http, by_grpc, rtol=1e-6)


def test_flywheels_clients_verify_the_server_against_the_ca(served, pki):
    port, grpc_port = _ports(served)
    with Client(f"https://localhost:{port}", ca_file=pki.ca) as c:
        assert c.infer("mlp", X).output().shape == (2, 10)
    with GrpcClient(f"grpcs://localhost:{grpc_port}", ca_file=pki.ca) as g:
        assert g.infer("mlp", X).output().shape == (2, 10)
    with Client(f"https://localhost:{port}") as c:  # the system's CAs do not know this one
        with pytest.raises(ClientError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            c.infer("mlp", X)


def test_plaintext_http_on_the_tls_port_gets_no_answer(served):
    port, _ = _ports(served)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        conn.request("GET", "/v2/health/ready")
        conn.getresponse()
    conn.close()


def test_mutual_tls_serves_a_client_with_a_certificate_and_refuses_one_without(mutual, pki):
    import tritonclient.grpc as grpcclient

    port, grpc_port = _ports(mutual)
    assert _listener(grpc_port) == "haproxy"  # TLS ends in the HAProxy front, not a fallback
    with Client(f"https://localhost:{port}", ca_file=pki.ca, cert_file=pki.client_cert,
                key_file=pki.client_key) as c:
        assert c.infer("mlp", X).output().shape == (2, 10)
    httpclient, client = _triton_http(port, pki.ca, pki.client_cert, pki.client_key)
    assert _triton_infer(httpclient, client).shape == (2, 10)
    client.close()
    gclient = grpcclient.InferenceServerClient(
        f"localhost:{grpc_port}", ssl=True, root_certificates=pki.ca, private_key=pki.client_key,
        certificate_chain=pki.client_cert)
    assert _triton_infer(grpcclient, gclient).shape == (2, 10)
    gclient.close()

    with Client(f"https://localhost:{port}", ca_file=pki.ca) as c:
        with pytest.raises(ClientError) as refused:
            c.infer("mlp", X)
    assert refused.value.status is None  # no answer: the handshake failed
    with GrpcClient(f"grpcs://localhost:{grpc_port}", ca_file=pki.ca, timeout=5) as g:
        with pytest.raises(ClientError):  # HAProxy ends the handshake: no call gets through
            g.infer("mlp", X)
