"""``flywheel serve``: serve the models of a deploy config until interrupted.

Also what ``flywheel run`` serves with once it has trained the demo model.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

import msgspec
import yaml

from flywheel.cli._shared import Phases
from flywheel.common.log_format import use_json_logs
from flywheel.common.ray_cluster import start_ray
from flywheel.common.settings import Settings, load_settings
from flywheel.protocol.errors import ConfigError
from flywheel.serving.config import DeployConfig, load_config


def load_deploy_config(arg: str) -> tuple[DeployConfig, Path | None]:
    """``--config``: a file, or the name of a preset that ships with
    Flywheel (``demo``, ``example``: flywheel.configs), whose model paths
    are relative to the preset's folder. Returns the config and that folder."""
    from flywheel.configs import preset, presets

    path = Path(arg)
    if path.is_file():
        return load_config(path), None
    found = preset(arg)
    if found is None:
        raise ConfigError(f"--config {arg!r}: no such file, and no packaged preset of that name "
                          f"(presets: {', '.join(presets())})")
    return load_config(found, base_dir=found.parent), found.parent


def apply_overrides(cfg: DeployConfig, settings: Settings, port: int | None,
                     grpc_port: int | None = None) -> DeployConfig:
    server = cfg.server
    if settings.http_host:
        server = msgspec.structs.replace(server, host=settings.http_host)
    if settings.http_port:
        server = msgspec.structs.replace(server, port=settings.http_port)
    if port is not None:
        server = msgspec.structs.replace(server, port=port)
    if grpc_port is not None:
        server = msgspec.structs.replace(server, grpc_port=grpc_port)
    return msgspec.structs.replace(cfg, server=server)


def serve_until_interrupted(cfg: DeployConfig, settings: Settings, example: str | None,
                            phases: Phases | None = None) -> None:
    """Start Ray, deploy ``cfg``, print where to call it and where the
    start-up time went (``phases`` may hold earlier steps: training ...),
    then serve until SIGINT / SIGTERM."""
    cfg.server.check_exposure()  # before anything starts
    phases = phases if phases is not None else Phases()
    print("starting Ray ...", flush=True)
    with phases.phase("start Ray"):
        start_ray(settings, log_to_driver=False)
    import ray
    from ray import serve

    from flywheel.serving.app import deploy, undeploy

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        print("deploying models ...", flush=True)
        started = time.perf_counter()
        dep = deploy(cfg, settings=settings, on_phase=phases.add)
        print(f"ready in {time.perf_counter() - started:.1f}s: V2 HTTP on {dep.url}", flush=True)
        print(phases.summary(), flush=True)
        if dep.grpc_target:
            print(f"V2 gRPC (inference.GRPCInferenceService) on {dep.grpc_target}", flush=True)
        for m in dep.config.models:
            source = f" (registry {m.ref})" if m.ref else ""
            print(f"  model {m.name} version {m.version}{source}: {dep.url}/v2/models/{m.name}", flush=True)
        if example:
            name = cfg.models[0].name
            print("\ntry it:\n", flush=True)
            print(
                f"  curl -s -X POST {dep.url}/v2/models/{name}/infer "
                f"-H 'Content-Type: application/json' -d @{example}\n",
                flush=True,
            )
        print("metrics: " + dep.url + "/metrics\nCtrl-C to stop.", flush=True)
        stop.wait()
        print("\nstopping ...", flush=True)
        undeploy(dep)
    finally:
        serve.shutdown()
        ray.shutdown()
    print("stopped.", flush=True)


def _cmd_serve(args: argparse.Namespace) -> None:
    settings = load_settings()
    if settings.log_format == "json":  # this process's records; each ingress replica sets its own
        use_json_logs()
    loaded, base_dir = load_deploy_config(args.config)
    cfg = apply_overrides(loaded, settings, args.port, args.grpc_port)
    if args.emit_serve_config:
        _emit(cfg, base_dir, args.emit_serve_config)
        return
    serve_until_interrupted(cfg, settings, None)


def _emit(cfg: DeployConfig, base_dir: Path | None, out: str) -> None:
    from flywheel.serving.deploy import serve_config

    text = yaml.safe_dump(serve_config(cfg, base_dir), sort_keys=False)
    header = ("# Ray Serve config for Flywheel deployment %r, written by `flywheel serve --emit-serve-config`.\n"
              "# Deploy it on a running Ray cluster with `serve deploy FILE` (or paste it into a KubeRay\n"
              "# RayService's spec.serveConfigV2).\n" % cfg.name)
    if out == "-":
        sys.stdout.write(header + text)
        return
    Path(out).write_text(header + text)
    print(f"wrote {out}: deploy it with `serve deploy {out}` on a running Ray cluster", flush=True)


HELP = "serve the models of a deploy config (or write it as a Ray Serve config)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help=HELP, description=__doc__)
    srv.add_argument("--config", required=True,
                     help="deploy config: a YAML file or a packaged preset name (demo, example)")
    add_port_arguments(srv)
    srv.add_argument("--emit-serve-config", metavar="OUT", default=None,
                     help="write a Ray Serve config file (for `serve deploy` or a KubeRay RayService) "
                          "that deploys this config, to OUT ('-' = stdout), instead of serving")
    srv.set_defaults(func=_cmd_serve)


def add_port_arguments(parser: argparse.ArgumentParser) -> None:
    """``--port`` and ``--grpc-port``, shared by ``run`` and ``serve``."""
    parser.add_argument("--port", type=int, default=None, help="HTTP port (overrides the config)")
    parser.add_argument("--grpc-port", type=int, default=None, help="gRPC port (overrides the config; -1 = off)")
