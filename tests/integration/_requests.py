"""One V2 infer call to the test MLP (64 -> 10) on a fresh connection, for the
tests that kill servers: returns the HTTP status, 0 when no answer came."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np

BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                               "data": np.linspace(0, 1, 64).tolist()}]}).encode()


def infer_status(base_url: str, model: str = "mlp") -> int:
    """A fresh connection each time, so that the kernel (SO_REUSEPORT) or a
    load balancer picks the server anew."""
    req = urllib.request.Request(f"{base_url}/v2/models/{model}/infer", BODY, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0
