"""The load generator's response checks (name and shape of every output)."""

import msgspec

from flywheel.bench.harness.payloads import WorkPlan
from flywheel.bench.harness.scenario import OutputSpec
from flywheel.bench.harness.worker import check_binary, check_grpc, check_json

PLAN = WorkPlan(http="http://127.0.0.1:1", grpc="", infer_path="/v2/models/m/infer", grpc_method="",
                weights={"http_json": 1.0}, timeout_s=1.0, variants=[],
                outputs=[OutputSpec(name="logits", shape=[1, -1])], batch=1)


def _json(shape, name="logits"):
    return msgspec.json.encode({"model_name": "m", "outputs": [
        {"name": name, "shape": shape, "datatype": "FP32", "data": [0.0] * 10}]})


def test_json_answers():
    assert check_json(PLAN, 200, _json([1, 10])) is None
    assert "expected [1, -1]" in check_json(PLAN, 200, _json([2, 10]))
    assert "missing" in check_json(PLAN, 200, _json([1, 10], name="probs"))
    assert check_json(PLAN, 400, b'{"error": "bad"}') == 'HTTP 400: {"error": "bad"}'
    assert "malformed" in check_json(PLAN, 200, b"<html>")


def test_binary_answers_check_the_declared_tensor_bytes():
    header = msgspec.json.encode({"outputs": [{"name": "logits", "shape": [1, 10], "datatype": "FP32",
                                               "parameters": {"binary_data_size": 40}}]})
    assert check_binary(PLAN, 200, header + bytes(40), str(len(header))) is None
    assert "carries 39" in check_binary(PLAN, 200, header + bytes(39), str(len(header)))


def test_grpc_answers():
    from flywheel.protocol.proto import inference_pb2 as pb

    resp = pb.ModelInferResponse(model_name="m")
    resp.outputs.add(name="logits", datatype="FP32", shape=[1, 10])
    assert check_grpc(PLAN, resp) is None
    resp.outputs[0].shape[:] = [1]
    assert "has shape [1]" in check_grpc(PLAN, resp)
