"""The third reference: KServe's Python ModelServer, same model.

KServe 0.21's ``kserve.ModelServer`` answers the V2 (Open Inference)
protocol over REST with FastAPI on uvicorn and over gRPC with grpc.aio, in
one process. Its pins (FastAPI, protobuf, grpcio) do not fit ours, so this
file is used from both sides: :func:`kserve`, in Flywheel's environment,
starts it as a script with the Python of KServe's own virtual environment
(``make bench-kserve``, .venv-kserve/)::

    .venv-kserve/bin/python bench/kserve_ref.py MODEL.onnx NAME HTTP_PORT GRPC_PORT

and as that script it imports nothing of Flywheel: a ``kserve.Model``
around an ONNX Runtime session (one thread, like ours and MLServer's),
served as KServe serves any Python model (it has no batching of its own).
KServe's per-request log lines (the access log, its timing lines, the gRPC
method line) are off, and its servers bind 127.0.0.1 (KServe binds every
address: its two server classes are swapped for ones that bind loopback).
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
import tempfile
from collections.abc import Iterator


def default_venv() -> str:
    from flywheel.common.settings import load_settings

    return load_settings().kserve_venv


def installed(venv: str) -> bool:
    return os.access(os.path.join(venv, "bin", "python"), os.X_OK) and \
        bool(glob.glob(os.path.join(venv, "lib", "python3*", "site-packages", "kserve", "model_server.py")))


@contextlib.contextmanager
def kserve(venv: str, model_path: str, name: str, http_port: int, grpc_port: int) -> Iterator[None]:
    """KServe serving ``model_path`` as ``name`` on 127.0.0.1 until the block ends."""
    from flywheel.bench.peer_process import peer_process

    folder = tempfile.mkdtemp(prefix="fw-kserve-")
    cmd = [os.path.join(os.path.abspath(venv), "bin", "python"), os.path.abspath(__file__),
           model_path, name, str(http_port), str(grpc_port)]
    with peer_process(cmd, folder, "kserve.log", f"http://127.0.0.1:{http_port}/v2/models/{name}/ready", "KServe"):
        yield


# -- the server, in KServe's environment --------------------------------------

def serve(model_path: str, name: str, http_port: int, grpc_port: int) -> None:
    """Run KServe's ModelServer with the ONNX model until SIGTERM."""
    import logging

    import kserve
    import numpy as np
    import onnxruntime as ort
    from grpc import aio
    from kserve import InferOutput, InferRequest, InferResponse
    from kserve import model_server as ms
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
    from kserve.protocol.grpc.servicer import InferenceServicer
    from kserve.utils.utils import generate_uuid

    class OnnxModel(kserve.Model):
        def load(self) -> bool:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            self._session = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
            self._input = self._session.get_inputs()[0].name
            self._output = self._session.get_outputs()[0].name
            self.ready = True
            return True

        async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
            x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
            y = self._session.run([self._output], {self._input: x})[0]
            # raw tensor bytes back where the request sent raw ones (gRPC), as
            # KServe's own runtimes answer
            binary = payload.use_binary_outputs
            out = InferOutput(name=self._output, shape=list(y.shape), datatype="FP32")
            out.set_data_from_numpy(y, binary_data=binary)
            return InferResponse(response_id=payload.id or generate_uuid(), model_name=self.name, infer_outputs=[out],
                                 use_binary_outputs=binary)

    class LoopbackREST(ms.RESTServer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.config.host = "127.0.0.1"

    class LoopbackGRPC(ms.GRPCServer):
        # GRPCServer.start as KServe 0.21 has it, bound to loopback
        async def start(self, max_workers):
            from concurrent import futures

            self._server = aio.server(
                futures.ThreadPoolExecutor(max_workers=max_workers),
                interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
                options=[("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                         ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length"))],
            )
            grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
                InferenceServicer(self._data_plane, self._model_repository_extension), self._server)
            self._server.add_insecure_port(f"127.0.0.1:{self._port}")
            await self._server.start()
            await self._server.wait_for_termination()

    ms.RESTServer, ms.GRPCServer = LoopbackREST, LoopbackGRPC
    model = OnnxModel(name)
    model.load()
    server = ms.ModelServer(http_port=http_port, grpc_port=grpc_port, workers=1, enable_latency_logging=False)
    # what KSERVE_LOGLEVEL=WARNING and no access log give: no line per request
    for logger in ("kserve", "kserve.trace", "uvicorn.access"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    server.start([model])


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
