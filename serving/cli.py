"""``flywheel`` command line: ``run`` (the demo job) and ``serve`` (a config)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import msgspec
import yaml

from flywheel.protocol.errors import ConfigError, FlywheelError
from flywheel.serving.app import deploy, start_ray, undeploy
from flywheel.serving.config import DeployConfig, load_config
from flywheel.serving.deploy import flywheel_version, serve_config
from flywheel.serving.settings import Settings, load_settings


def _load(arg: str) -> tuple[DeployConfig, Path | None]:
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


def _apply_overrides(cfg: DeployConfig, settings: Settings, port: int | None,
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


def _serve_until_interrupted(cfg: DeployConfig, settings: Settings, example: str | None) -> None:
    cfg.server.check_exposure()  # before anything starts
    print("starting Ray ...", flush=True)
    start_ray(settings, log_to_driver=False)
    import ray
    from ray import serve

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        print("deploying models ...", flush=True)
        started = time.perf_counter()
        dep = deploy(cfg, settings=settings)
        print(f"ready in {time.perf_counter() - started:.1f}s: V2 HTTP on {dep.url}", flush=True)
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


def _cmd_run(args: argparse.Namespace) -> None:
    from flywheel.registry import Registry
    from flywheel.runtime.extras import require_extra

    require_extra("train", ("torch", "sklearn"), "flywheel run (it trains the demo model)")
    from flywheel.training.digits import register_digits, train_digits

    settings = load_settings()
    cfg = _apply_overrides(_load(args.config)[0], settings, args.port, args.grpc_port)
    out_dir = os.path.join(settings.home, "work", "digits")
    print(f"training the digits demo model ({args.epochs} epochs) ...", flush=True)
    result = train_digits(out_dir, epochs=args.epochs)
    print(f"trained: val accuracy {result.val_accuracy:.3f}; ONNX export checked against torch", flush=True)
    registry = Registry.open(settings.registry_uri, settings.artifacts_uri)
    try:
        mv = register_digits(registry, result, actor=settings.actor, epochs=args.epochs)
        registry.promote("digits", mv.version, "staging", actor=settings.actor)
        registry.promote("digits", mv.version, "production", actor=settings.actor)
        print(f"registered {mv.ref} (onnx, safetensors, reference sample) and promoted it to production",
              flush=True)
        print(f"  registry: {settings.registry_uri}   lineage: flywheel models lineage digits@production",
              flush=True)
        _export_demo(registry, mv, settings)
    finally:
        registry.close()
    _serve_until_interrupted(cfg, settings, os.path.relpath(result.example_path))


def _export_demo(registry, mv, settings: Settings) -> None:
    """The mobile bundle of the demo: int8 ONNX Runtime mobile format, gated
    and registered as a derivative. A gate failure is reported, not fatal:
    the fp32 model is what gets served."""
    from flywheel.runtime.edge_export import export_bundle
    from flywheel.serving.export_cli import register_bundle, source_from_registry

    out = os.path.join(settings.home, "exports", f"{mv.name}-{mv.version}-ort-mobile-int8")
    print(f"exporting the mobile bundle (int8, ORT mobile format) to {out} ...", flush=True)
    try:
        _, source = source_from_registry(registry, mv.ref)
        report = export_bundle(source, "ort-mobile", out, quantize="int8",
                               progress=lambda msg: print("  " + msg, flush=True))
        derived = register_bundle(registry, mv, report, actor=settings.actor)
        print(f"  registered {derived.ref} (derivative of {mv.ref})", flush=True)
    except FlywheelError as exc:
        print(f"  edge export skipped: {exc.message}", flush=True)
    except Exception as exc:  # noqa: BLE001 - an export problem must not stop the demo from serving
        print(f"  edge export failed ({type(exc).__name__}: {exc}); serving the fp32 model anyway", flush=True)


def _cmd_serve(args: argparse.Namespace) -> None:
    settings = load_settings()
    loaded, base_dir = _load(args.config)
    cfg = _apply_overrides(loaded, settings, args.port, args.grpc_port)
    if args.emit_serve_config:
        _emit(cfg, base_dir, args.emit_serve_config)
        return
    _serve_until_interrupted(cfg, settings, None)


def _emit(cfg: DeployConfig, base_dir: Path | None, out: str) -> None:
    text = yaml.safe_dump(serve_config(cfg, base_dir), sort_keys=False)
    header = ("# Ray Serve config for Flywheel deployment %r, written by `flywheel serve --emit-serve-config`.\n"
              "# Deploy it on a running Ray cluster with `serve deploy FILE` (or paste it into a KubeRay\n"
              "# RayService's spec.serveConfigV2).\n" % cfg.name)
    if out == "-":
        sys.stdout.write(header + text)
        return
    Path(out).write_text(header + text)
    print(f"wrote {out}: deploy it with `serve deploy {out}` on a running Ray cluster", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flywheel", description=__doc__)
    parser.add_argument("--version", action="version", version=f"flywheel-ml {flywheel_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the digits demo, export it to ONNX and serve it")
    run.add_argument("--config", default="demo",
                     help="deploy config: a YAML file or a packaged preset name (default: demo)")
    run.add_argument("--epochs", type=int, default=15, help="training epochs of the demo model")
    run.add_argument("--port", type=int, default=None, help="HTTP port (overrides the config)")
    run.add_argument("--grpc-port", type=int, default=None, help="gRPC port (overrides the config; -1 = off)")
    run.set_defaults(func=_cmd_run)
    srv = sub.add_parser("serve", help="serve the models of a config file")
    srv.add_argument("--config", required=True,
                     help="deploy config: a YAML file or a packaged preset name (demo, example)")
    srv.add_argument("--port", type=int, default=None, help="HTTP port (overrides the config)")
    srv.add_argument("--grpc-port", type=int, default=None, help="gRPC port (overrides the config; -1 = off)")
    srv.add_argument("--emit-serve-config", metavar="OUT", default=None,
                     help="write a Ray Serve config file (for `serve deploy` or a KubeRay RayService) "
                          "that deploys this config, to OUT ('-' = stdout), instead of serving")
    srv.set_defaults(func=_cmd_serve)
    from flywheel.serving.models_cli import add_parser as add_models_parser

    add_models_parser(sub)
    from flywheel.serving.export_cli import add_parser as add_export_parser

    add_export_parser(sub)
    from flywheel.serving.keys_cli import add_parser as add_keys_parser

    add_keys_parser(sub)
    from flywheel.serving.loadbalancer import add_parser as add_lb_parser

    add_lb_parser(sub)
    from flywheel.bench.harness.cli import add_parser as add_bench_parser

    add_bench_parser(sub)
    from flywheel.training.cli import add_parser as add_train_parser

    add_train_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except FlywheelError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
