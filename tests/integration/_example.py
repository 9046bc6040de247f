"""The packaged example model (configs/example.yaml), asked through V2 HTTP
by the tests that serve it from an installed wheel or a container image."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parents[2] / "configs" / "examples"


def check_example_answer(url: str) -> None:
    """Send the packaged request to ``url``'s example model; its answer must
    be what ONNX Runtime computes from the packaged model file."""
    request = (EXAMPLES / "request.json").read_bytes()
    req = urllib.request.Request(f"{url}/v2/models/example/infer", data=request,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        out = json.loads(resp.read())["outputs"][0]
    assert out["shape"] == [2, 3]
    assert np.allclose(out["data"], _expected(request).ravel(), atol=1e-6)


def _expected(request: bytes) -> np.ndarray:
    import onnxruntime as ort

    inp = json.loads(request)["inputs"][0]
    session = ort.InferenceSession(str(EXAMPLES / "linear.onnx"))
    return session.run(None, {"input": np.asarray(inp["data"], np.float32).reshape(inp["shape"])})[0]
