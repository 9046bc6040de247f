"""Declarative deployment: Flywheel as a Ray Serve application builder.

``serve deploy`` and KubeRay's ``RayService.serveConfigV2`` deploy Serve
applications named by an import path and built from arguments. ``app`` is
that builder: its arguments are a Flywheel deploy config (the same fields as
``configs/*.yaml``) and the Flywheel version that wrote them, and it builds
the same application that ``flywheel serve`` deploys (serving/app.py).
``serve_config`` writes such a Serve config file from a DeployConfig
(``flywheel serve --config x.yaml --emit-serve-config out.yaml``).

How an update lands: Serve rebuilds the application when its arguments
change (a new model version, a new ``ref``) and replaces the replicas; the
ingress is replaced with surge (new replicas bind the ports beside the old
ones, SO_REUSEPORT) and the old ones drain their connections
(serving/ingress.py, DRAIN_S), so a colocated model's update fails no request.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import msgspec

from flywheel.common.version import flywheel_version
from flywheel.protocol.errors import ConfigError
from flywheel.serving.config import DeployConfig, parse_config, with_paths_under

IMPORT_PATH = "flywheel.serving.deploy:app"

__all__ = ["IMPORT_PATH", "app", "serve_config"]


def app(args: dict[str, Any]):
    """The Serve application builder named by :data:`IMPORT_PATH`.

    ``args``: ``{"config": <deploy config mapping>, "flywheel_version": "x.y.z"}``.
    Runs on the cluster (in Serve's build task), where the registry is found
    through that node's settings (``FLYWHEEL_REGISTRY_URI``) unless the config
    names it. Raises ConfigError, which Serve shows as the application's
    DEPLOY_FAILED message, for a config that does not validate or was written
    by another Flywheel version than the cluster runs.
    """
    import ray

    from flywheel.serving.app import build_application, check_gpus, resolve_models
    from flywheel.common.settings import load_settings

    if not isinstance(args, dict) or not isinstance(args.get("config"), dict):
        raise ConfigError("args.config: expected the Flywheel deploy config as a mapping "
                          "(write the file with `flywheel serve --config x.yaml --emit-serve-config out.yaml`)")
    wrote, runs = args.get("flywheel_version"), flywheel_version()
    if wrote is not None and wrote != runs:
        raise ConfigError(f"args.flywheel_version: this Serve config was written by Flywheel {wrote}, but the "
                          f"cluster runs Flywheel {runs}; install flywheel-ml=={wrote} on every node or emit "
                          f"the config again with Flywheel {runs}")
    config = parse_config(args["config"])
    check_fixed_ports(config)
    config.server.check_exposure()
    config = resolve_models(config, load_settings())
    check_gpus(config, ray.cluster_resources().get("GPU", 0.0))
    # Stable for a given config: the router controller then resumes its state
    # when Serve restarts it, and starts afresh when the config changes.
    deploy_id = hashlib.sha256(json.dumps(args["config"], sort_keys=True).encode()).hexdigest()[:32]
    return build_application(config, deploy_id=deploy_id)


def check_fixed_ports(config: DeployConfig) -> None:
    """Every replica of a declarative deployment binds the same public ports,
    so "any free port" (0) cannot be resolved once for all of them."""
    if config.server.port == 0:
        raise ConfigError("server.port: a Serve config needs a fixed port (0 picks a different one per replica)")
    if config.server.grpc_port == 0:
        raise ConfigError("server.grpc_port: a Serve config needs a fixed port or -1 (off), not 0")


def serve_config(config: DeployConfig, base_dir: str | Path | None = None) -> dict[str, Any]:
    """A Ray Serve config (``ServeDeploySchema``) that deploys ``config``.

    Model and TLS file paths become absolute (resolved against ``base_dir``, default the
    working folder): the file is read on the cluster, not here. Fields left
    at their defaults are left out, so the file reads like the preset.
    """
    from flywheel.serving.app import application_name

    check_fixed_ports(config)
    config.server.check_exposure()
    config = with_paths_under(config, Path(base_dir or ".").resolve())
    return {
        # Flywheel's ingress replicas serve HTTP and gRPC themselves.
        "proxy_location": "Disabled",
        "applications": [{
            "name": application_name(config),
            # no Serve route: several Flywheel deployments can share a cluster
            "route_prefix": None,
            "import_path": IMPORT_PATH,
            "args": {"flywheel_version": flywheel_version(), "config": without_defaults(config)},
        }],
    }


def without_defaults(obj: Any) -> Any:
    """``obj`` as plain data, leaving out struct fields equal to their defaults."""
    if isinstance(obj, msgspec.Struct):
        out = {}
        for field in msgspec.structs.fields(obj):
            value = getattr(obj, field.name)
            if field.default is not msgspec.NODEFAULT:
                default = field.default
            elif field.default_factory is not msgspec.NODEFAULT:
                default = field.default_factory()
            else:
                out[field.encode_name] = without_defaults(value)
                continue
            if value != default:
                out[field.encode_name] = without_defaults(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [without_defaults(v) for v in obj]
    if isinstance(obj, dict):
        return {k: without_defaults(v) for k, v in obj.items()}
    return msgspec.to_builtins(obj)
