"""``flywheel`` command line: ``run`` (the demo job) and ``serve`` (a config)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

import msgspec

from flywheel.runtime.errors import FlywheelError
from flywheel.serving.app import deploy, start_ray, undeploy
from flywheel.serving.config import DeployConfig, load_config
from flywheel.serving.settings import Settings, load_settings


def _apply_overrides(cfg: DeployConfig, settings: Settings, port: int | None) -> DeployConfig:
    server = cfg.server
    if settings.http_host:
        server = msgspec.structs.replace(server, host=settings.http_host)
    if settings.http_port:
        server = msgspec.structs.replace(server, port=settings.http_port)
    if port is not None:
        server = msgspec.structs.replace(server, port=port)
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
    from flywheel.training.digits import register_digits, train_digits

    settings = load_settings()
    cfg = _apply_overrides(load_config(args.config), settings, args.port)
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
    cfg = _apply_overrides(load_config(args.config), settings, args.port)
    _serve_until_interrupted(cfg, settings, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flywheel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the digits demo, export it to ONNX and serve it")
    run.add_argument("--config", default="configs/demo.yaml")
    run.add_argument("--epochs", type=int, default=15)
    run.add_argument("--port", type=int, default=None, help="HTTP port (overrides the config)")
    run.set_defaults(func=_cmd_run)
    srv = sub.add_parser("serve", help="serve the models of a config file")
    srv.add_argument("--config", required=True)
    srv.add_argument("--port", type=int, default=None)
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
