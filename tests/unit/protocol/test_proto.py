"""The committed gRPC stubs match inference.proto, and the wire contract holds."""

from __future__ import annotations

from pathlib import Path

from flywheel.protocol.proto import inference_pb2 as pb
from flywheel.protocol.proto.generate import HERE, OUTPUTS, generate


def test_committed_stubs_are_not_stale(tmp_path):
    generate(tmp_path)
    for name in OUTPUTS:
        assert (tmp_path / name).read_text() == (HERE / name).read_text(), (
            f"{name} is stale: run python -m flywheel.protocol.proto.generate"
        )


def _numbers(message) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


def test_field_numbers_match_the_protocol():
    # shared/design/PROTOCOL.md: these numbers are what current clients use
    assert _numbers(pb.ModelInferRequest) == {
        "model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "inputs": 5,
        "outputs": 6, "raw_input_contents": 7,
    }
    assert _numbers(pb.ModelInferRequest.InferInputTensor) == {
        "name": 1, "datatype": 2, "shape": 3, "parameters": 4, "contents": 5,
    }
    assert _numbers(pb.ModelInferResponse) == {
        "model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "outputs": 5,
        "raw_output_contents": 6,
    }
    assert _numbers(pb.InferParameter) == {"bool_param": 1, "int64_param": 2, "string_param": 3}
    assert _numbers(pb.InferTensorContents) == {
        "bool_contents": 1, "int_contents": 2, "int64_contents": 3, "uint_contents": 4,
        "uint64_contents": 5, "fp32_contents": 6, "fp64_contents": 7, "bytes_contents": 8,
    }
    assert _numbers(pb.ModelMetadataResponse) == {
        "name": 1, "versions": 2, "platform": 3, "inputs": 4, "outputs": 5,
    }
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {m.name for m in service.methods} == {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
    }


def test_stubs_coexist_with_tritonclient_in_one_process():
    import tritonclient.grpc.service_pb2 as triton_pb

    ours = pb.ModelInferRequest(model_name="m")
    theirs = triton_pb.ModelInferRequest.FromString(ours.SerializeToString())
    assert theirs.model_name == "m"
    assert Path(pb.__file__).name == "inference_pb2.py"
