"""Pre/post steps and pipelines deployed on the session's Ray and called with
tritonclient over HTTP and gRPC, in one deployment:

- ``sentiment``: the example of examples/pipeline_tokenizer (a tokenizer
  step, an ONNX model, a label step), colocated in the ingress;
- ``scorer``: a two-stage pipeline (an ONNX stage, then a python stage that
  answers BYTES labels), colocated too (one replica process: lean).

Each shows its outer signature, answers BYTES labels, and a failing step
fails its request only: the next request succeeds.
"""

from __future__ import annotations

import importlib.util
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from flywheel.serving.app import deploy, undeploy
from flywheel.serving.config import parse_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = "examples/pipeline_tokenizer"
W = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], np.float32)

HEAD = """
import numpy as np

class Head:
    def predict(self, inputs):
        h = inputs["h"]
        if (h > 1000).any():
            raise ValueError("h above 1000")
        names = np.array([b"first", b"second", b"third"], dtype=object)
        return {"label": names[h.argmax(axis=1)]}
"""


def embed_model(path: Path) -> str:
    """x FP32 [batch, 4] -> h FP32 [batch, 3] = x @ W."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"])], "embed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(W, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline-serving")
    folder = root / EXAMPLE
    shutil.copytree(ROOT / EXAMPLE, folder, ignore=shutil.ignore_patterns("model.onnx", "vocab.txt", "__pycache__"))
    spec = importlib.util.spec_from_file_location("example_make_model", folder / "make_model.py")
    make_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_model)
    make_model.build(folder)
    (root / "head").mkdir()
    (root / "head" / "head.py").write_text(textwrap.dedent(HEAD))
    embed_model(root / "embed.onnx")

    import yaml

    doc = yaml.safe_load((folder / "serve.yaml").read_text())
    doc["name"] = "pipelines"
    doc["server"] = {"port": 0, "grpc_port": 0}
    doc["models"][0]["num_cpus"] = 0.05
    doc["models"].append({
        "name": "scorer", "num_cpus": 0.05,
        "pipeline": [
            {"name": "embed", "path": "embed.onnx"},
            {"name": "head", "path": "head", "backend": "python",
             "python": {"class": "head:Head", "batched": True,
                        "inputs": [{"name": "h", "datatype": "FP32", "shape": [-1, 3]}],
                        "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]}]}},
        ],
    })
    # the example's paths are relative to the repository root; the others to root
    cfg = parse_config(doc, base_dir=root)
    dep = deploy(cfg)
    yield dep
    undeploy(dep)


def clients(dep):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    http_url = dep.url.removeprefix("http://")
    return ((httpclient, httpclient.InferenceServerClient(url=http_url)),
            (grpcclient, grpcclient.InferenceServerClient(url=dep.grpc_target)))


def test_metadata_shows_each_models_outer_signature(served):
    for mod, client in clients(served):
        try:
            for name, inputs, outputs in (("sentiment", [("text", "BYTES")], [("label", "BYTES")]),
                                          ("scorer", [("x", "FP32")], [("label", "BYTES")])):
                meta = client.get_model_metadata(name, as_json=True) if mod.__name__.endswith("grpc") \
                    else client.get_model_metadata(name)
                assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == inputs, (mod.__name__, name)
                assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == outputs, (mod.__name__, name)
        finally:
            client.close()


def test_a_bytes_text_gets_bytes_labels_back(served):
    for mod, client in clients(served):
        try:
            text = mod.InferInput("text", [3], "BYTES")
            text.set_data_from_numpy(np.array([b"what fun", b"boring", b"okay then"], dtype=object))
            labels = client.infer("sentiment", [text]).as_numpy("label").tolist()
            assert labels == [b"positive", b"negative", b"neutral"], mod.__name__
        finally:
            client.close()


def test_a_two_stage_pipeline_answers_in_one_call(served):
    x = np.array([[1, 0, 0, 0], [0, 5, 0, 1], [0, 0, 2, 0]], np.float32)
    for mod, client in clients(served):
        try:
            inp = mod.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            labels = client.infer("scorer", [inp]).as_numpy("label").tolist()
            assert labels == [b"first", b"second", b"third"], mod.__name__
        finally:
            client.close()


def test_a_failing_step_fails_its_request_and_the_next_one_succeeds(served):
    from tritonclient.utils import InferenceServerException

    for mod, client in clients(served):
        try:
            inp = mod.InferInput("x", [1, 4], "FP32")
            inp.set_data_from_numpy(np.full((1, 4), 5000, np.float32))
            with pytest.raises(InferenceServerException) as err:
                client.infer("scorer", [inp])
            assert "pipeline[1] ('head'): model 'head': predict raised ValueError: h above 1000" in err.value.message()
            inp.set_data_from_numpy(np.ones((1, 4), np.float32))
            assert client.infer("scorer", [inp]).as_numpy("label").tolist() == [b"first"]
        finally:
            client.close()
