from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import threading
import types

import numpy as np
import onnxruntime as ort
import pytest

from flywheel.protocol.errors import ConfigError, IntegrityError, UnavailableError
from flywheel.runtime.backends.onnx_backend import (
    OnnxRuntimeBackend,
    OnnxRuntimeConfig,
    onnx_input_shapes,
    provider_options,
)
from flywheel.runtime.backends.tensorrt_backend import TensorRTBackend
from flywheel.runtime.backends.tensorrt_plan import (
    TensorRTConfig,
    engine_cache_key,
    file_sha256,
    import_gpu_stack,
    onnx_has_qdq,
    tensorrt_available,
    v2_datatype_of,
    write_atomically,
)
from flywheel.serving.config import ModelConfig, parse_config
from flywheel.serving.model_server import make_backend

GPU = tensorrt_available()
NO_GPU_REASON = "no CUDA GPU with TensorRT on this machine"


# --- importing needs neither TensorRT nor CuPy --------------------------------------------


def test_importing_the_backend_imports_neither_tensorrt_nor_cupy():
    code = (
        "import sys, flywheel.runtime.backends.tensorrt_backend, flywheel.serving.config;"
        "print('tensorrt' in sys.modules, 'cupy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --- TensorRTConfig and the model config ---------------------------------------------------


def test_tensorrt_config_defaults_are_a_valid_fp16_profile():
    cfg = TensorRTConfig()
    assert (cfg.precision, cfg.profile, cfg.calibration, cfg.qdq) == ("fp16", (1, 16, 32), "", False)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"precision": "fp8"}, "tensorrt.precision 'fp8' unknown"),
        ({"min_batch": 0}, "tensorrt.min_batch 0"),
        ({"min_batch": 8, "opt_batch": 4}, "min_batch <= opt_batch"),
        ({"opt_batch": 64, "max_batch": 32}, "opt_batch <= max_batch"),
        ({"workspace_mib": 0}, "tensorrt.workspace_mib"),
        ({"device": -1}, "tensorrt.device"),
        ({"precision": "int8"}, "tensorrt.calibration is required for precision int8"),
        ({"precision": "int8", "calibration": "rows.pkl"}, "tensorrt.calibration 'rows.pkl' must be a .npy"),
        ({"precision": "int8", "qdq": True, "calibration": "r.npy"}, "tensorrt.calibration must be empty"),
        ({"calibration": "r.npy"}, "tensorrt.calibration applies to precision int8 only"),
        ({"qdq": True}, "tensorrt.qdq applies to precision int8 only"),
    ],
)
def test_tensorrt_config_rejects_bad_values_naming_the_field(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        TensorRTConfig(**kwargs)
    assert fragment in info.value.message


def test_int8_accepts_either_calibration_rows_or_a_qdq_model():
    assert TensorRTConfig(precision="int8", calibration="rows.npy").calibration == "rows.npy"
    assert TensorRTConfig(precision="int8", qdq=True).qdq


def _tensorrt_model(**overrides):
    model = {"name": "m", "path": "m.onnx", "backend": "tensorrt"}
    model.update(overrides)
    return {"models": [model]}


def test_a_tensorrt_model_config_validates_with_typed_settings():
    cfg = parse_config(
        _tensorrt_model(
            tensorrt={"precision": "int8", "calibration": "rows.npy", "opt_batch": 32, "max_batch": 64,
                      "cache_dir": "/var/cache/plans"},
            batching={"max_batch_size": 64},
        )
    )
    (m,) = cfg.models
    assert m.backend == "tensorrt"
    assert m.tensorrt == TensorRTConfig(
        precision="int8", calibration="rows.npy", opt_batch=32, max_batch=64, cache_dir="/var/cache/plans"
    )


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        ({"tensorrt": {"precision": "fp8"}}, ["tensorrt.precision", "$.models[0].tensorrt"]),
        ({"tensorrt": {"min_batch": 4, "opt_batch": 2}}, ["tensorrt.min_batch", "$.models[0].tensorrt"]),
        ({"tensorrt": {"precision": "int8"}}, ["tensorrt.calibration", "$.models[0].tensorrt"]),
        ({"tensorrt": {"colour": "red"}}, ["colour", "$.models[0].tensorrt"]),
        ({"tensorrt": {"max_batch": "many"}}, ["$.models[0].tensorrt.max_batch"]),
        ({"tensorrt": {"max_batch": 16}}, ["tensorrt.max_batch 16", "batching.max_batch_size 32"]),
        (
            {"backend": "onnxruntime", "tensorrt": {"precision": "fp32"}},
            ["tensorrt settings", "'onnxruntime'"],
        ),
        ({"backend": "tensorflow"}, ["backend 'tensorflow' unknown", "tensorrt", "onnxruntime, torch"]),
    ],
)
def test_a_bad_tensorrt_model_config_names_the_field(overrides, fragments):
    with pytest.raises(ConfigError) as info:
        parse_config(_tensorrt_model(**overrides))
    for fragment in fragments:
        assert fragment in info.value.message


def test_make_backend_builds_a_tensorrt_backend_without_touching_the_gpu(mlp_onnx):
    backend = make_backend(ModelConfig(name="m", path=mlp_onnx, backend="tensorrt"))
    assert isinstance(backend, TensorRTBackend)
    assert backend.platform == "tensorrt_plan"
    assert backend.cache_dir == os.path.join(os.path.dirname(mlp_onnx), ".tensorrt-cache")
    with pytest.raises(RuntimeError, match="load"):
        backend.signature


def test_backend_construction_checks_the_files(tmp_path, mlp_onnx):
    with pytest.raises(ConfigError, match="does not exist"):
        TensorRTBackend(str(tmp_path / "nope.onnx"))
    cfg = TensorRTConfig(precision="int8", calibration=str(tmp_path / "rows.npy"))
    with pytest.raises(ConfigError, match="tensorrt.calibration file"):
        TensorRTBackend(mlp_onnx, cfg)


# --- the engine cache key ------------------------------------------------------------------

KEY_ARGS = dict(
    onnx_sha256="ab" * 32,
    gpu_name="NVIDIA H100 80GB HBM3",
    compute_capability="9.0",
    trt_version="10.13.0.35",
    precision="fp16",
    profile=(1, 16, 32),
)


def test_cache_key_is_deterministic_hex():
    key = engine_cache_key(**KEY_ARGS)
    assert key == engine_cache_key(**KEY_ARGS)
    assert len(key) == 64
    assert int(key, 16) >= 0
    assert key == engine_cache_key(**{**KEY_ARGS, "onnx_sha256": "AB" * 32})  # hex case is not identity


@pytest.mark.parametrize(
    "change",
    [
        {"onnx_sha256": "cd" * 32},
        {"gpu_name": "NVIDIA A100-SXM4-80GB"},
        {"compute_capability": "8.0"},
        {"trt_version": "10.13.0.36"},
        {"precision": "int8"},
        {"profile": (1, 16, 64)},
        {"profile": (2, 16, 32)},
        {"profile": (1, 8, 32)},
        {"calibration_sha256": "ef" * 32},
    ],
)
def test_cache_key_changes_with_each_component(change):
    assert engine_cache_key(**{**KEY_ARGS, **change}) != engine_cache_key(**KEY_ARGS)


def test_cache_key_rejects_a_profile_that_is_not_min_opt_max():
    with pytest.raises(ConfigError, match="min, opt, max"):
        engine_cache_key(**{**KEY_ARGS, "profile": (1, 32)})


# --- pure helpers of the backend -----------------------------------------------------------


def test_write_atomically_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "cache" / "k.plan"
    write_atomically(str(target), b"first")
    write_atomically(str(target), b"second plan")
    assert target.read_bytes() == b"second plan"
    with pytest.raises(TypeError, match="bytes-like object is required"):
        write_atomically(str(target), "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"second plan"
    assert os.listdir(target.parent) == ["k.plan"]


def test_file_sha256_hashes_the_bytes(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * (3 << 20))
    assert file_sha256(str(path)) == hashlib.sha256(b"x" * (3 << 20)).hexdigest()


def _qdq_model(path):
    import onnx
    from onnx import TensorProto, helper

    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1])
    zero = helper.make_tensor("zero", TensorProto.INT8, [], [0])
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[scale, zero],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return str(path)


def test_onnx_has_qdq_tells_quantized_models_apart(tmp_path, mlp_onnx):
    assert not onnx_has_qdq(mlp_onnx)
    assert onnx_has_qdq(_qdq_model(tmp_path / "qdq.onnx"))


def test_tensorrt_datatypes_map_to_v2_or_are_refused_by_name():
    assert v2_datatype_of(types.SimpleNamespace(name="HALF"), "x") == "FP16"
    assert v2_datatype_of(types.SimpleNamespace(name="FLOAT"), "x") == "FP32"
    assert v2_datatype_of("DataType.INT64", "x") == "INT64"
    with pytest.raises(ConfigError, match="'logits' has TensorRT type BF16"):
        v2_datatype_of(types.SimpleNamespace(name="BF16"), "logits")


def test_calls_outside_the_batch_profile_are_sliced_and_padded(mlp_onnx):
    # The engine is replaced by a row-wise function that records the batch
    # sizes it is given: every call must fit the profile [3, 4], and the
    # results must be the row-wise results in order.
    backend = TensorRTBackend(mlp_onnx)
    backend._batch_range = (3, 4)
    seen = []

    def engine(slot, inputs):
        seen.append(inputs["input"].shape[0])
        return {"logits": inputs["input"][:, :2] * 2}

    backend._run = engine
    x = np.arange(11 * 64, dtype=np.float32).reshape(11, 64)
    for rows in (1, 3, 4, 11):
        seen.clear()
        out = backend._infer_rows(None, {"input": x[:rows]})
        np.testing.assert_array_equal(out["logits"], x[:rows, :2] * 2)
        assert seen
        assert all(3 <= n <= 4 for n in seen)


# --- loading without TensorRT / CuPy / a GPU -----------------------------------------------


def test_import_gpu_stack_without_tensorrt_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    with pytest.raises(UnavailableError) as info:
        import_gpu_stack()
    assert "TensorRT is not installed" in info.value.message
    assert "pip install 'flywheel-ml[gpu]'" in info.value.message


def test_import_gpu_stack_refuses_tensorrt_before_10(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(UnavailableError, match="needs TensorRT 10.x; found 8.6.1"):
        import_gpu_stack()


def test_import_gpu_stack_without_cupy_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.13.0"))
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(UnavailableError, match="CuPy is not installed"):
        import_gpu_stack()


@pytest.mark.skipif(GPU, reason="TensorRT and a GPU are present here")
def test_loading_without_tensorrt_raises_the_clear_error(mlp_onnx):
    backend = TensorRTBackend(mlp_onnx)
    with pytest.raises(UnavailableError) as info:
        backend.load()
    assert "backend tensorrt" in info.value.message
    assert not os.path.exists(backend.cache_dir)


@pytest.mark.skipif(GPU, reason="TensorRT and a GPU are present here")
def test_gpu_check_script_exits_2_with_one_line_without_tensorrt(capsys):
    from flywheel.bench.gpu_tensorrt_check import main

    assert main() == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert "TensorRT" in out


def test_a_pickle_is_refused_before_anything_else(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=4))
    with pytest.raises(IntegrityError, match="pickle"):
        TensorRTBackend(str(path)).load()


# --- ONNX Runtime's TensorRT / CUDA providers ----------------------------------------------


def test_cpu_only_config_gets_no_provider_options():
    assert provider_options(OnnxRuntimeConfig(), ["CPUExecutionProvider"]) == [("CPUExecutionProvider", {})]


def test_tensorrt_provider_options_carry_precision_cache_and_profile():
    cfg = OnnxRuntimeConfig(
        providers=("tensorrt", "cuda", "cpu"),
        device_id=1,
        trt_fp16=True,
        trt_int8=True,
        trt_int8_calibration_table="calib.table",
        trt_engine_cache_path="/cache/trt",
        trt_batch_profile=(1, 8, 64),
        trt_workspace_mib=512,
    )
    shapes = {"input": (-1, 64), "mask": (-1, 3, 4), "fixed": (2, 5)}
    pairs = provider_options(
        cfg, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], shapes
    )
    assert pairs == [
        (
            "TensorrtExecutionProvider",
            {
                "device_id": "1",
                "trt_fp16_enable": "1",
                "trt_int8_enable": "1",
                "trt_int8_calibration_table_name": "calib.table",
                "trt_max_workspace_size": str(512 << 20),
                "trt_engine_cache_enable": "1",
                "trt_engine_cache_path": "/cache/trt",
                "trt_timing_cache_enable": "1",
                "trt_timing_cache_path": "/cache/trt",
                "trt_profile_min_shapes": "input:1x64,mask:1x3x4",
                "trt_profile_opt_shapes": "input:8x64,mask:8x3x4",
                "trt_profile_max_shapes": "input:64x64,mask:64x3x4",
            },
        ),
        ("CUDAExecutionProvider", {"device_id": "1"}),
        ("CPUExecutionProvider", {}),
    ]


def test_tensorrt_provider_defaults_turn_reduced_precision_off_and_cache_nothing():
    (pair,) = provider_options(OnnxRuntimeConfig(providers=("tensorrt",)), ["TensorrtExecutionProvider"])
    assert pair == (
        "TensorrtExecutionProvider",
        {"device_id": "0", "trt_fp16_enable": "0", "trt_int8_enable": "0"},
    )


def test_a_batch_profile_needs_fixed_non_batch_dims():
    cfg = OnnxRuntimeConfig(providers=("tensorrt",), trt_batch_profile=(1, 4, 8))
    with pytest.raises(ConfigError, match="input 'tokens' has shape \\[-1, -1\\]"):
        provider_options(cfg, ["TensorrtExecutionProvider"], {"tokens": (-1, -1)})


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"trt_fp16": True}, "onnxruntime.trt_fp16 is a TensorRT setting"),
        ({"trt_engine_cache_path": "/c"}, "onnxruntime.trt_engine_cache_path is a TensorRT setting"),
        (
            {"providers": ("tensorrt",), "trt_batch_profile": (4, 2, 8)},
            "onnxruntime.trt_batch_profile [4, 2, 8]",
        ),
        ({"providers": ("tensorrt",), "trt_batch_profile": (1, 2)}, "onnxruntime.trt_batch_profile [1, 2]"),
        ({"providers": ("tensorrt",), "trt_int8_calibration_table": "t"}, "needs onnxruntime.trt_int8"),
        ({"providers": ("tensorrt",), "trt_workspace_mib": -1}, "onnxruntime.trt_workspace_mib"),
        ({"device_id": -1}, "onnxruntime.device_id"),
    ],
)
def test_onnxruntime_tensorrt_settings_are_validated_naming_the_field(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        OnnxRuntimeConfig(**kwargs)
    assert fragment in info.value.message


def test_onnx_input_shapes_reads_the_graph_inputs(mlp_onnx):
    assert onnx_input_shapes(mlp_onnx) == {"input": (-1, 64)}


def test_tensorrt_provider_settings_still_fall_back_to_cpu(mlp_onnx, rng):
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT provider: nothing falls back")
    cfg = OnnxRuntimeConfig(
        providers=("tensorrt", "cuda", "cpu"), trt_fp16=True, trt_batch_profile=(1, 8, 32)
    )
    backend = OnnxRuntimeBackend(mlp_onnx, cfg)
    backend.load()
    assert backend.providers == ["CPUExecutionProvider"]
    x = rng.standard_normal((3, 64)).astype(np.float32)
    want = ort.InferenceSession(mlp_onnx, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(backend.infer({"input": x})["logits"], want, atol=1e-6)


# --- on a GPU with TensorRT ----------------------------------------------------------------


def _ort_cpu(path, x):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason=NO_GPU_REASON)
def test_fp16_engine_matches_onnxruntime_and_is_cached(mlp_onnx, tmp_path, rng):  # pragma: no cover - GPU
    cfg = TensorRTConfig(cache_dir=str(tmp_path / "plans"), min_batch=1, opt_batch=8, max_batch=16)
    first = TensorRTBackend(mlp_onnx, cfg)
    first.load()
    assert first.built
    assert os.path.isfile(first.cache_path)
    assert [(t.name, t.datatype, t.shape) for t in first.signature.inputs] == [("input", "FP32", (-1, 64))]
    assert [(t.name, t.datatype, t.shape) for t in first.signature.outputs] == [("logits", "FP32", (-1, 10))]
    for rows in (1, 5, 16, 37):  # 37 runs as three slices
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        got = first.infer({"input": x})["logits"]
        assert got.shape == (rows, 10)
        assert np.abs(got - _ort_cpu(mlp_onnx, x)).max() <= 1e-2
    again = TensorRTBackend(mlp_onnx, cfg)
    again.load()
    assert not again.built
    assert again.cache_path == first.cache_path
    assert os.listdir(tmp_path / "plans") == [os.path.basename(first.cache_path)]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason=NO_GPU_REASON)
def test_concurrent_calls_each_get_their_own_context(mlp_onnx, tmp_path, rng):  # pragma: no cover - GPU
    backend = TensorRTBackend(mlp_onnx, TensorRTConfig(cache_dir=str(tmp_path), precision="fp32"))
    backend.load()
    xs = [rng.standard_normal((8, 64)).astype(np.float32) for _ in range(8)]
    results: dict[int, np.ndarray] = {}

    def call(i):
        for _ in range(20):
            results[i] = backend.infer({"input": xs[i]})["logits"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, x in enumerate(xs):
        assert np.abs(results[i] - _ort_cpu(mlp_onnx, x)).max() <= 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason=NO_GPU_REASON)
def test_int8_engine_from_calibration_rows_tracks_fp32(mlp_onnx, tmp_path, rng):  # pragma: no cover - GPU
    rows = rng.standard_normal((256, 64)).astype(np.float32)
    np.save(tmp_path / "rows.npy", rows)
    cfg = TensorRTConfig(precision="int8", calibration=str(tmp_path / "rows.npy"), cache_dir=str(tmp_path))
    backend = TensorRTBackend(mlp_onnx, cfg)
    backend.load()
    x = rng.standard_normal((32, 64)).astype(np.float32)
    got, want = backend.infer({"input": x})["logits"], _ort_cpu(mlp_onnx, x)
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.95
