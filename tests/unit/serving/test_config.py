from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from flywheel.protocol.errors import ConfigError
from flywheel.serving.config import load_config, parse_config
from flywheel.common.settings import load_settings

ROOT = Path(__file__).resolve().parents[3]


def test_demo_preset_loads_with_typed_values():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    (m,) = cfg.models
    assert (m.name, m.ref, m.backend) == ("digits", "digits@production", "onnxruntime")
    assert m.batching.max_batch_size == 64
    assert m.batching.max_queue_delay_us == 200
    assert cfg.server.host == "127.0.0.1"
    assert cfg.server.port == 8000


def test_relative_model_paths_resolve_against_base_dir(tmp_path):
    cfg = parse_config({"models": [{"name": "m", "path": "a/b.onnx"}]}, base_dir=tmp_path)
    assert cfg.models[0].path == str(tmp_path / "a" / "b.onnx")


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"models": [{"name": "m", "path": "x", "batching": {"max_batch_size": 0}}]}, "max_batch_size"),
        ({"models": [{"name": "m", "path": "x", "batching": {"max_batch_size": 0}}]}, "$.models[0].batching"),
        ({"models": [{"name": "m", "path": "x", "replicas": "two"}]}, "$.models[0].replicas"),
        ({"models": [{"name": "m", "path": "x", "backend": "tf"}]}, "allowed: onnxruntime, torch, tensorrt, python - at `$.models[0]`"),
        ({"models": [{"name": "m", "path": "x", "colour": "red"}]}, "colour"),
        ({"models": [{"name": "bad name", "path": "x"}]}, "model name 'bad name'"),
        ({"models": [{"name": "m", "path": "x"}, {"name": "m", "path": "y"}]}, "listed twice"),
        ({"server": {"port": 70000}, "models": []}, "server.port"),
        ({"models": [{"name": "m", "path": "x", "backend": "torch"}]}, "architecture"),
        ({}, "models"),
        ({"models": [{"name": "m"}]}, "exactly one of 'path' and 'ref'"),
        ({"models": [{"name": "m", "path": "x", "ref": "m@prod"}]}, "exactly one of 'path' and 'ref'"),
    ],
)
def test_invalid_config_names_the_field(data, fragment):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert fragment in info.value.message


def test_invalid_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_settings_read_only_from_the_given_environment():
    s = load_settings({"RAY_ADDRESS": "ray://h:1", "FLYWHEEL_HTTP_PORT": "9001"})
    assert s.ray_address == "ray://h:1"
    assert s.http_port == 9001
    assert s.ray_auth_mode == "disabled"
    with pytest.raises(ValueError, match="FLYWHEEL_HTTP_PORT"):
        load_settings({"FLYWHEEL_HTTP_PORT": "x"})


def _gpu_models():
    return parse_config({"models": [
        {"name": "cpu", "path": "x"},
        {"name": "trt", "path": "y", "backend": "tensorrt"},
        {"name": "ort-gpu", "path": "z", "onnxruntime": {"providers": ["cuda", "cpu"]}},
        {"name": "ort-trt", "path": "w", "onnxruntime": {"providers": ["tensorrt", "cpu"]}},
        {"name": "shared", "path": "v", "onnxruntime": {"providers": ["cuda"]}, "num_gpus": 0.25},
    ]})


def test_replicas_of_a_gpu_model_ask_ray_for_a_gpu():
    from flywheel.serving.app import _actor_options

    cpu, trt, ort_gpu, ort_trt, shared = _gpu_models().models
    assert _actor_options(0.5, [cpu]) == {"num_cpus": 0.5}
    # ONNX Runtime's CUDA / TensorRT providers: placed on a GPU node, never a
    # CPU node where they would fall back to the CPU unseen
    assert _actor_options(0.5, [ort_gpu]) == {"num_cpus": 0.5, "num_gpus": 1}
    assert _actor_options(0.5, [ort_trt]) == {"num_cpus": 0.5, "num_gpus": 1}
    assert _actor_options(1.5, [cpu, trt]) == {"num_cpus": 1.5, "num_gpus": 1}
    assert _actor_options(0.5, [shared]) == {"num_cpus": 0.5, "num_gpus": 0.25}  # num_gpus overrides


def test_a_gpu_model_on_a_cluster_without_a_gpu_is_refused_naming_why():
    from flywheel.serving.app import check_gpus

    cfg = _gpu_models()
    cpu, trt, ort_gpu, _, shared = cfg.models
    check_gpus(msgspec.structs.replace(cfg, models=[cpu]), 0.0)  # no GPU needed: passes
    check_gpus(cfg, 1.0)
    with pytest.raises(ConfigError, match=r"model 'ort-gpu' needs 1 GPU per replica "
                                          r"\(onnxruntime.providers \['cuda', 'cpu'\]\).*has 0"):
        check_gpus(msgspec.structs.replace(cfg, models=[cpu, ort_gpu]), 0.0)
    with pytest.raises(ConfigError, match=r"model 'trt' needs 1 GPU per replica \(backend tensorrt\)"):
        check_gpus(msgspec.structs.replace(cfg, models=[trt]), 0.0)
    with pytest.raises(ConfigError, match=r"model 'shared' needs 0.25 GPU per replica \(num_gpus\)"):
        check_gpus(msgspec.structs.replace(cfg, models=[shared]), 0.0)
    # num_gpus: 0 keeps the providers and accepts ONNX Runtime's CPU fallback
    zero = msgspec.structs.replace(ort_gpu, num_gpus=0.0)
    check_gpus(msgspec.structs.replace(cfg, models=[zero]), 0.0)


def test_new_server_and_auth_limits_are_validated_naming_the_field():
    for bad, field in [({"server": {"header_timeout_s": 0}}, "header_timeout_s"),
                       ({"server": {"max_connections": 0}}, "max_connections"),
                       ({"server": {"max_url_bytes": 10}}, "max_url_bytes"),
                       ({"server": {"auth": {"rate_per_key": -1}}}, "rate_per_key"),
                       ({"models": [{"name": "m", "path": "x", "num_gpus": -1}]}, "num_gpus")]:
        with pytest.raises(ConfigError, match=field):
            parse_config({"models": [{"name": "m", "path": "x"}], **bad})
    cfg = parse_config({"models": [{"name": "m", "path": "x"}],
                        "endpoints": [{"name": "m", "allow_signature_change": True}]})
    assert cfg.endpoints[0].allow_signature_change and cfg.server.max_connections == 10_000


def test_replicas_per_node_limits_the_ingress_on_each_node():
    with pytest.raises(ConfigError, match="server.replicas_per_node"):
        parse_config({"server": {"replicas_per_node": -1}, "models": []})
    assert parse_config({"models": []}).server.replicas_per_node == 0  # no limit

