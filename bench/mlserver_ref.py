"""The second reference: MLServer (Seldon) with adaptive batching, same model.

MLServer has no ONNX runtime of its own, so this writes the smallest custom
runtime (an ``MLModel`` around an ONNX Runtime session, one thread, like ours)
into a model folder with ``max_batch_size`` / ``max_batch_time`` (adaptive
batching) and starts ``mlserver start`` from MLServer's own virtual
environment: its pins (FastAPI, uvicorn, protobuf) do not fit ours.
Create that environment with ``make bench-mlserver`` (.venv-mlserver/).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator

RUNTIME = '''
import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(self.settings.parameters.uri, opts,
                                             providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        y = self._session.run([self._output], {self._input: x})[0]
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output(self._output, y)])
'''


def default_venv() -> str:
    from flywheel.common.settings import load_settings

    return load_settings().mlserver_venv


def installed(venv: str) -> bool:
    return os.access(os.path.join(venv, "bin", "mlserver"), os.X_OK)


@contextlib.contextmanager
def mlserver(venv: str, model_path: str, name: str, http_port: int, grpc_port: int,
             workers: int = 1) -> Iterator[None]:
    """MLServer serving ``model_path`` as ``name`` on 127.0.0.1 until the block ends."""
    folder = tempfile.mkdtemp(prefix="fw-mlserver-")
    with open(os.path.join(folder, "onnx_runtime.py"), "w") as f:
        f.write(RUNTIME)
    with open(os.path.join(folder, "settings.json"), "w") as f:
        json.dump({"host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port,
                   "metrics_port": 0, "parallel_workers": workers, "debug": False}, f)
    with open(os.path.join(folder, "model-settings.json"), "w") as f:
        json.dump({"name": name, "implementation": "onnx_runtime.OnnxModel",
                   "max_batch_size": 32, "max_batch_time": 0.0005,
                   "parameters": {"uri": model_path}}, f)
    from flywheel.bench.peer_process import peer_process

    # absolute: MLServer runs in its model folder (the default venv path is relative)
    cmd = [os.path.join(os.path.abspath(venv), "bin", "mlserver"), "start", folder]
    with peer_process(cmd, folder, "mlserver.log", f"http://127.0.0.1:{http_port}/v2/models/{name}/ready",
                      "MLServer"):
        yield
