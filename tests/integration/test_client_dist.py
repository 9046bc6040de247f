"""The flywheel-client wheel installs into a fresh virtual environment
without Ray, torch or ONNX Runtime, and its client and protocol work there.

Integration: it builds a wheel and installs NumPy, msgspec, grpcio and
protobuf from the package index into a new venv (about a minute)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# runs inside the fresh venv: the server's dependencies are absent, and the
# client's request encoding round-trips through the protocol's decoder
PROBE = """
import importlib.util, sys
import numpy as np
import flywheel.client, flywheel.protocol
from flywheel.client import Client, GrpcClient, InferResult
from flywheel.protocol.codec import decode_infer_request
from flywheel.protocol.proto import inference_pb2
for heavy in ("ray", "torch", "onnxruntime", "flywheel.serving", "flywheel.runtime"):
    try:
        found = importlib.util.find_spec(heavy)
    except ModuleNotFoundError:
        found = None
    print(heavy, "present" if found else "absent")
from flywheel.client._v2 import encode_infer
body, header_length = encode_infer({"x": np.arange(6, dtype=np.float32).reshape(2, 3)}, binary=True,
                                   request_id=None, outputs=None, parameters=None)
decoded = decode_infer_request(body, header_length=header_length)
print("round trip", decoded.inputs["x"].tolist())
print("proto", inference_pb2.ModelInferRequest(model_name="m").model_name)
"""


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, str(ROOT / "deploy" / "client_wheel.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


def test_the_wheel_holds_the_client_and_the_protocol_only(client_wheel):
    names = zipfile.ZipFile(client_wheel).namelist()
    tops = {"/".join(n.split("/")[:2]) for n in names if n.startswith("flywheel/")}
    assert tops == {"flywheel/client", "flywheel/protocol"}
    assert "flywheel/protocol/proto/inference_pb2.py" in names
    assert not any(n.startswith("flywheel/__init__") for n in names)


def test_the_client_installs_and_works_without_the_server(client_wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "-c", str(ROOT / "requirements.lock"), f"{client_wheel}[grpc]"],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stderr
    probe = subprocess.run([str(py), "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.splitlines()
    for heavy in ("ray", "torch", "onnxruntime", "flywheel.serving", "flywheel.runtime"):
        assert f"{heavy} absent" in lines
    assert "round trip [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]" in lines
    assert "proto m" in lines
