"""The Serve config that `flywheel serve --emit-serve-config` writes, and the
checks the Serve application builder makes before anything is deployed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

import flywheel.configs
from flywheel.protocol.errors import ConfigError
from flywheel.cli import main
from flywheel.cli.serve import load_deploy_config
from flywheel.serving.config import load_config, parse_config
from flywheel.common.version import flywheel_version
from flywheel.serving.deploy import IMPORT_PATH, app, serve_config

ROOT = Path(__file__).resolve().parents[3]


def _app_args(doc: dict) -> dict:
    [application] = doc["applications"]
    return application["args"]


def test_the_emitted_demo_config_is_a_valid_serve_config():
    doc = serve_config(load_config(ROOT / "configs" / "demo.yaml"))
    schema = ServeDeploySchema.model_validate(doc)
    assert schema.applications[0].import_path == IMPORT_PATH


def test_the_emitted_config_parses_back_to_the_same_deploy_config():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert parse_config(_app_args(serve_config(cfg))["config"]) == cfg


def test_the_emitted_config_leaves_defaults_out():
    config = _app_args(serve_config(load_config(ROOT / "configs" / "demo.yaml")))["config"]
    assert "registry" not in config
    assert "endpoints" not in config


def test_model_paths_become_absolute_against_the_config_folder(tmp_path):
    cfg = parse_config({"models": [{"name": "m", "path": "models/m.onnx"}]})
    config = _app_args(serve_config(cfg, base_dir=tmp_path))["config"]
    assert config["models"][0]["path"] == str(tmp_path / "models" / "m.onnx")


def test_the_emitted_config_carries_this_flywheel_version():
    doc = serve_config(load_config(ROOT / "configs" / "example.yaml"))
    assert _app_args(doc)["flywheel_version"] == flywheel_version()


def test_serve_proxy_is_off_and_the_application_claims_no_route():
    doc = serve_config(load_config(ROOT / "configs" / "example.yaml"))
    assert doc["proxy_location"] == "Disabled"
    assert doc["applications"][0]["route_prefix"] is None


def test_a_config_with_any_free_port_cannot_be_emitted():
    cfg = parse_config({"server": {"port": 0}, "models": [{"name": "m", "path": "m.onnx"}]})
    with pytest.raises(ConfigError, match=r"server\.port: a Serve config needs a fixed port"):
        serve_config(cfg)


def test_a_public_bind_without_auth_cannot_be_emitted():
    cfg = parse_config({"server": {"host": "0.0.0.0"}, "models": [{"name": "m", "path": "m.onnx"}]})
    with pytest.raises(ConfigError, match=r"server\.host '0\.0\.0\.0' is reachable from other hosts"):
        serve_config(cfg)


def test_the_builder_refuses_a_config_written_by_another_flywheel_naming_both():
    args = {"flywheel_version": "0.0.1", "config": {"models": [{"name": "m", "path": "m.onnx"}]}}
    with pytest.raises(ConfigError, match=rf"written by Flywheel 0\.0\.1, but the cluster runs Flywheel "
                                          rf"{flywheel_version()}"):
        app(args)


def test_the_builder_names_a_bad_field_of_the_config():
    args = {"flywheel_version": flywheel_version(), "config": {"models": [{"name": "m", "path": "m.onnx"}],
                                                               "server": {"port": 70000}}}
    with pytest.raises(ConfigError, match=r"server\.port 70000 must lie in \[0, 65535\]"):
        app(args)


def test_the_builder_wants_the_config_as_a_mapping():
    with pytest.raises(ConfigError, match=r"args\.config: expected the Flywheel deploy config"):
        app({"config": "configs/demo.yaml"})


def test_the_cli_writes_the_serve_config_file(tmp_path, capsys):
    out = tmp_path / "serve.yaml"
    assert main(["serve", "--config", "example", "--emit-serve-config", str(out)]) == 0
    doc = yaml.safe_load(out.read_text())
    assert _app_args(doc)["config"]["models"][0]["path"].endswith("configs/examples/linear.onnx")


def test_the_cli_names_the_packaged_presets_when_a_config_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--config", "nowhere.yaml"]) == 2
    assert "no packaged preset of that name (presets: " in capsys.readouterr().err


def test_the_demo_preset_is_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, base = load_deploy_config("demo")
    assert cfg.models[0].ref == "digits@production"
    assert base == Path(flywheel.configs.__file__).parent


def test_a_file_named_on_the_command_line_wins_over_a_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("models: [{name: mine, path: mine.onnx}]\n")
    cfg, base = load_deploy_config("demo")
    assert cfg.models[0].name == "mine"
    assert base is None
