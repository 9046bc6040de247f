"""The pipeline example (examples/pipeline_tokenizer: a tokenizer step, an
ONNX model, a label step) served as its README says, colocated in a real
ingress without Ray, and asked with its own client and with tritonclient
over HTTP and gRPC; plus the model-config checks of ``preprocess`` /
``postprocess`` / ``pipeline``, without a server."""

from __future__ import annotations

import importlib.util
import shutil
import socket
from pathlib import Path

import msgspec
import numpy as np
import pytest

from flywheel.common.settings import load_settings
from flywheel.protocol.errors import ConfigError
from flywheel.registry import Registry
from flywheel.serving.app import resolve_models
from flywheel.serving.config import load_config, parse_config
from flywheel.serving.ingress import Ingress
from flywheel.serving.model_server import make_backend

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = "examples/pipeline_tokenizer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The example's files copied to a folder laid out as the repository
    (its config's paths are relative to the root), its model made there by
    its own script, and its config served on free ports."""
    root = tmp_path_factory.mktemp("example-root")
    folder = root / EXAMPLE
    shutil.copytree(ROOT / EXAMPLE, folder, ignore=shutil.ignore_patterns("model.onnx", "vocab.txt", "__pycache__"))
    load_module(folder / "make_model.py").build(folder)
    cfg = load_config(folder / "serve.yaml", base_dir=root)
    server = msgspec.structs.replace(cfg.server, port=free_port(), grpc_port=free_port(), grpc_server="grpcio")
    ingress = Ingress(server, [], colocated=cfg.models)
    yield {"http": f"127.0.0.1:{server.port}", "grpc": f"127.0.0.1:{server.grpc_port}",
           "client": load_module(folder / "client.py")}
    ingress.close()


def test_the_examples_client_gets_a_label_per_text(example):
    labels = example["client"].classify(example["http"], ["a great film", "so boring", "it was okay", ""])
    assert labels == ["positive", "negative", "neutral", "neutral"]


def test_grpc_metadata_shows_the_outer_signature_and_infer_answers_bytes_labels(example):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    client = grpcclient.InferenceServerClient(url=example["grpc"])
    try:
        meta = client.get_model_metadata("sentiment", as_json=True)
        assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("text", "BYTES", ["-1"])]
        assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [("label", "BYTES", ["-1"])]
        text = grpcclient.InferInput("text", [2], "BYTES")
        text.set_data_from_numpy(np.array([b"I love it", b"awful, terrible"], dtype=object))
        assert client.infer("sentiment", [text]).as_numpy("label").tolist() == [b"positive", b"negative"]
    finally:
        client.close()


def test_a_step_refusing_its_input_gives_400_over_http_and_invalid_argument_over_grpc(example):
    httpclient = pytest.importorskip("tritonclient.http")
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    bad = np.array([b"\xff\xfe not utf-8"], dtype=object)
    for mod, url, status in ((httpclient, example["http"], "400"), (grpcclient, example["grpc"], "INVALID_ARGUMENT")):
        client = mod.InferenceServerClient(url=url)
        try:
            text = mod.InferInput("text", [1], "BYTES")
            text.set_data_from_numpy(bad)
            with pytest.raises(InferenceServerException) as err:
                client.infer("sentiment", [text])
            assert status in str(err.value.status())
            assert "input 'text'[0] is not UTF-8 text" in err.value.message()
            text.set_data_from_numpy(np.array([b"great fun"], dtype=object))
            assert client.infer("sentiment", [text]).as_numpy("label").tolist() == [b"positive"]
        finally:
            client.close()


# --- config checks, no server ---------------------------------------------------------------

STAGES = [{"name": "a", "path": "a.onnx"}, {"name": "b", "path": "b.onnx"}]


def model(**fields) -> dict:
    return {"models": [{"name": "p", **fields}]}


@pytest.mark.parametrize("fields, expected", [
    ({"pipeline": STAGES, "path": "x.onnx"}, "model 'p': a pipeline takes its files from its stages"),
    ({"pipeline": STAGES, "backend": "python"}, "model 'p': a pipeline's backend and its settings are given per stage"),
    ({"pipeline": [STAGES[0], {**STAGES[1], "name": "a"}]}, r"model 'p': pipeline\[1\].name 'a' is given twice"),
    ({"pipeline": [STAGES[0], {"name": "b", "path": "h", "backend": "python"}]},
     r"model 'p': pipeline\[1\]: model 'b': backend python needs python.class"),
    ({"pipeline": STAGES, "preprocess": {"class": "s:T", "inputs": [{"name": "t", "datatype": "BYTES", "shape": [-1]}]}},
     "preprocess / postprocess are not taken by a pipeline"),
    ({"path": "m.onnx", "postprocess": {"class": "s:L"}}, "model 'p': postprocess.outputs is required"),
])
def test_pipeline_and_step_configs_are_refused_naming_the_field(fields, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_config(model(**fields))


def test_stage_paths_resolve_like_model_paths(tmp_path):
    cfg = parse_config(model(pipeline=STAGES), base_dir=tmp_path)
    assert [s.path for s in cfg.models[0].pipeline] == [str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")]
    assert [m.name for m in cfg.models[0].stage_models()] == ["a", "b"]


def test_a_registered_version_finds_its_steps_among_its_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # the registry's local cache of version folders
    src = tmp_path / "src"
    shutil.copytree(ROOT / EXAMPLE, src, ignore=shutil.ignore_patterns("model.onnx", "vocab.txt", "__pycache__"))
    load_module(src / "make_model.py").build(src)
    uri, artifacts = f"sqlite:///{tmp_path}/r.db", str(tmp_path / "artifacts")
    reg = Registry.open(uri, artifacts)
    try:
        reg.register_version("sentiment", {n: src / n for n in ("model.onnx", "steps.py", "vocab.txt")}, actor="t")
    finally:
        reg.close()
    doc = {"registry": {"uri": uri, "artifacts": artifacts},
           "models": [{"name": "sentiment", "ref": "sentiment",
                       "preprocess": {"class": "steps:Tokenize", "kwargs": {"vocab": "vocab.txt", "length": 8},
                                      "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}]},
                       "postprocess": {"class": "steps:Labels", "kwargs": {"labels": ["neg", "mid", "pos"]},
                                       "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]}]}}]}
    cfg = resolve_models(parse_config(doc), load_settings({}))
    backend = make_backend(cfg.models[0], cfg.registry)
    backend.load()
    try:
        out = backend.infer({"text": np.array([b"good fun", b"bad"], dtype=object)})
        assert out["label"].tolist() == [b"pos", b"neg"]
    finally:
        backend.close()
