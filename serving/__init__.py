"""Flywheel serving: the V2 (Open Inference Protocol) server on Ray Serve."""

from flywheel.serving.app import Deployment, deploy, start_ray, undeploy
from flywheel.serving.config import DeployConfig, ModelConfig, ServerConfig, load_config, parse_config
from flywheel.serving.settings import Settings, load_settings

__all__ = [
    "DeployConfig",
    "Deployment",
    "ModelConfig",
    "ServerConfig",
    "Settings",
    "deploy",
    "load_config",
    "load_settings",
    "parse_config",
    "start_ray",
    "undeploy",
]
