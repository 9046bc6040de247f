"""Flywheel's Python client: a thin layer over the V2 (Open Inference) protocol.

    from flywheel.client import Client
    with Client("http://127.0.0.1:8000") as c:
        r = c.infer("digits", x)          # x: np.ndarray or {input name: array}
        r.output(), r.model_version, r.request_id

``Client`` / ``AsyncClient`` speak HTTP (JSON or the binary tensor extension,
keep-alive, stdlib only); ``GrpcClient`` / ``AsyncGrpcClient`` speak V2 gRPC
(grpc is imported only when one is made). Every call that fails raises
``ClientError`` (``.status``, ``.message``). Nothing here imports Ray.
"""

from flywheel.client._aio_http import AsyncClient
from flywheel.client._grpc import AsyncGrpcClient, GrpcClient
from flywheel.client._http import Client
from flywheel.client._result import ClientError, InferResult

__all__ = ["AsyncClient", "AsyncGrpcClient", "Client", "ClientError", "GrpcClient", "InferResult"]
