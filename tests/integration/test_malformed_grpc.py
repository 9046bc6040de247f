"""The malformed-request corpus in its gRPC form, over a raw gRPC channel
(tritonclient would refuse to send most of these): each is answered with
INVALID_ARGUMENT or NOT_FOUND and a message, and the replica keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from flywheel.protocol.proto import inference_pb2 as pb

pytestmark = pytest.mark.integration
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def _req(name="input", datatype="FP32", shape=(1, 64), values=None, field="fp32_contents", model="digits", version=""):
    r = pb.ModelInferRequest(model_name=model, model_version=version)
    inp = r.inputs.add(name=name, datatype=datatype, shape=list(shape))
    getattr(inp.contents, field).extend([0.5] * 64 if values is None else values)
    return r


def _raw(datatype="FP32", shape=(1, 64), raw=b"\0" * 256, extra_inputs=0):
    r = pb.ModelInferRequest(model_name="digits")
    r.inputs.add(name="input", datatype=datatype, shape=list(shape))
    for i in range(extra_inputs):
        r.inputs.add(name=f"extra{i}", datatype=datatype, shape=list(shape))
    r.raw_input_contents.append(raw)
    return r


def _with(r, fn):
    fn(r)
    return r


CORPUS = [
    ("truncated protobuf", b"\x0a\x10digi", INVALID, "malformed"),
    ("empty request", pb.ModelInferRequest(), NOT_FOUND, "unknown model ''"),
    ("no inputs", pb.ModelInferRequest(model_name="digits"), INVALID, "at least one"),
    ("unknown tensor name", _req(name="pixels"), INVALID, "unknown input 'pixels'"),
    ("wrong datatype", _req(datatype="INT32", field="int_contents", values=[1] * 64), INVALID, "datatype must be FP32"),
    ("unknown datatype", _req(datatype="FLOAT"), INVALID, "unknown datatype 'FLOAT'"),
    ("contents count != shape", _req(values=[0.5] * 63), INVALID, "needs 64 elements"),
    ("negative shape", _req(shape=(-1, 64)), INVALID, "non-negative"),
    ("huge shape", _req(shape=(1 << 40, 64)), INVALID, "more than the limit"),
    ("wrong rank", _req(shape=(64,)), INVALID, "does not match the model's [-1, 64]"),
    ("wrong fixed dim", _req(shape=(1, 63), values=[0.5] * 63), INVALID, "does not match"),
    ("ints in the wrong contents field", _req(datatype="INT64", field="fp32_contents", shape=(1,), values=[1.5]), INVALID, "int64_contents has 0"),
    ("out of range for INT8", _req(datatype="INT8", field="int_contents", shape=(1,), values=[300]), INVALID, "out of range"),
    ("duplicate input names", _with(_req(), lambda r: r.inputs.append(r.inputs[0])), INVALID, "more than once"),
    ("no data at all", _req(values=[]), INVALID, "has 0"),
    ("contents and raw together", _with(_req(), lambda r: r.raw_input_contents.append(b"\0" * 256)), INVALID, "no input may also set contents"),
    ("raw count != inputs", _raw(extra_inputs=1), INVALID, "one per input"),
    ("raw size != shape", _raw(raw=b"\0" * 255), INVALID, "255 raw bytes"),
    ("FP16 in typed contents", _req(datatype="FP16", field="fp32_contents"), INVALID, "only as raw"),
    ("truncated BYTES raw", _raw(datatype="BYTES", shape=(1,), raw=b"\x09\0\0\0ab"), INVALID, "runs past the end"),
    ("zero rows", _req(shape=(0, 64), values=[]), INVALID, "batch dimension"),
    ("batch over max_batch_size", _req(shape=(65, 64), values=[0.5] * 65 * 64), INVALID, "max_batch_size"),
    ("unknown requested output", _with(_req(), lambda r: r.outputs.add(name="probs")), INVALID, "unknown requested output"),
    ("unknown model", _req(model="nope"), NOT_FOUND, "unknown model 'nope'"),
    ("unknown version", _req(version="7"), NOT_FOUND, "no version '7'"),
]


@pytest.fixture
def infer(demo):
    channel = grpc.insecure_channel(demo.grpc_target)
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    yield lambda payload: call(payload, timeout=10)
    channel.close()


def test_grpc_corpus_has_at_least_20_kinds():
    assert len({kind for kind, *_ in CORPUS}) >= 20


@pytest.mark.parametrize("kind, request_, code, fragment", CORPUS, ids=[c[0] for c in CORPUS])
def test_malformed_grpc_request_gets_a_status_with_a_message(infer, kind, request_, code, fragment):
    payload = request_ if isinstance(request_, bytes) else request_.SerializeToString()
    with pytest.raises(grpc.RpcError) as info:
        infer(payload)
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details()
    ok = pb.ModelInferResponse.FromString(infer(_req().SerializeToString()))
    assert np.frombuffer(ok.raw_output_contents[0], np.float32).shape == (10,)


def test_no_grpc_request_of_the_corpus_was_an_internal_error(demo, infer):
    import urllib.request

    for _, request_, _, _ in CORPUS:
        try:
            infer(request_ if isinstance(request_, bytes) else request_.SerializeToString())
        except grpc.RpcError as exc:
            assert exc.code() != grpc.StatusCode.INTERNAL, exc.details()
    text = urllib.request.urlopen(f"{demo.url}/metrics").read()
    assert b'outcome="internal"' not in text
