"""The reference: the same ONNX model as a plain Ray Serve deployment.

What a Ray Serve user writes first: a deployment class whose ``__call__``
takes Serve's Starlette request (V2 JSON in, V2 JSON out) and whose
``ModelInfer`` answers V2 gRPC through Serve's gRPC proxy, both feeding one
``@serve.batch`` method in front of ONNX Runtime. No validation, no auth, no
metrics of its own: Serve's defaults, as documented.
"""

from __future__ import annotations

import numpy as np
from ray import serve

GRPC_SERVICER = "flywheel.protocol.proto.inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"


@serve.deployment
class RayServeModel:
    def __init__(self, path: str, name: str) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        self._name = name

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def _infer(self, rows: list[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(r) for r in rows]
        out = self._session.run([self._output], {self._input: np.concatenate(rows)})[0]
        return np.split(out, np.cumsum(sizes)[:-1])

    async def __call__(self, request) -> dict:
        body = await request.json()
        inp = body["inputs"][0]
        x = np.asarray(inp["data"], dtype=np.float32).reshape(inp["shape"])
        y = await self._infer(x)
        return {"model_name": self._name, "outputs": [
            {"name": self._output, "datatype": "FP32", "shape": list(y.shape), "data": y.ravel().tolist()}]}

    async def ModelInfer(self, request):  # noqa: N802 - the RPC's name
        from flywheel.protocol.proto import inference_pb2 as pb

        shape = list(request.inputs[0].shape)
        x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(shape)
        y = await self._infer(x)
        resp = pb.ModelInferResponse(model_name=self._name)
        out = resp.outputs.add(name=self._output, datatype="FP32")
        out.shape.extend(y.shape)
        resp.raw_output_contents.append(np.ascontiguousarray(y).tobytes())
        return resp
