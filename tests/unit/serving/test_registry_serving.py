"""Serving loads models from the registry by reference, verified."""

from __future__ import annotations

import pytest

from flywheel.registry import Registry
from flywheel.protocol.errors import ConfigError, IntegrityError, NotFoundError
from flywheel.serving.app import resolve_models
from flywheel.serving.config import ModelConfig, RegistryConfig, parse_config
from flywheel.serving.replica import make_backend
from flywheel.common.settings import load_settings


@pytest.fixture
def registry(tmp_path, mlp_onnx):
    cfg = RegistryConfig(uri=f"sqlite:///{tmp_path}/r.db", artifacts=str(tmp_path / "artifacts"))
    reg = Registry.open(cfg.uri, cfg.artifacts)
    for _ in range(2):
        reg.register_version("mlp", {"model.onnx": mlp_onnx}, actor="t")
    reg.set_alias("mlp", "champion", 1, actor="t")
    yield reg, cfg
    reg.close()


def test_aliases_are_pinned_to_a_version_at_deploy_time(registry):
    reg, cfg = registry
    deploy_cfg = parse_config({"registry": {"uri": cfg.uri, "artifacts": cfg.artifacts}, "models": [
        {"name": "a", "ref": "mlp@champion"}, {"name": "b", "ref": "mlp"}, {"name": "c", "ref": "mlp/2", "version": "x"}]})
    out = resolve_models(deploy_cfg, load_settings({}))
    assert [(m.ref, m.version) for m in out.models] == [("mlp/1", "1"), ("mlp/2", "2"), ("mlp/2", "x")]
    assert out.registry == cfg


def test_unknown_reference_or_artifact_fails_at_deploy_time(registry):
    _, cfg = registry
    with pytest.raises(NotFoundError, match="no alias 'prod'"):
        resolve_models(parse_config({"registry": msgspec_dict(cfg), "models": [{"name": "a", "ref": "mlp@prod"}]}),
                       load_settings({}))
    with pytest.raises(ConfigError, match="no artifact 'weights'"):
        resolve_models(parse_config({"registry": msgspec_dict(cfg), "models": [
            {"name": "a", "ref": "mlp/1", "artifact": "weights"}]}), load_settings({}))


def msgspec_dict(cfg):
    return {"uri": cfg.uri, "artifacts": cfg.artifacts}


def test_replica_loads_the_verified_artifact_and_refuses_a_tampered_one(registry):
    reg, cfg = registry
    model = ModelConfig(name="mlp", ref="mlp/1", version="1")
    backend = make_backend(model, cfg)
    backend.load()
    assert backend.signature.inputs[0].name == "input"
    blob = reg.get_version("mlp", 1).artifacts["model.onnx"].uri
    with open(blob, "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    with pytest.raises(IntegrityError, match="integrity check"):
        make_backend(model, cfg)
