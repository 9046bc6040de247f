"""``flywheel run``: the demo job. Trains the digits model, registers and
promotes it, exports its mobile bundle, then serves it until interrupted."""

from __future__ import annotations

import argparse
import os

from flywheel.cli._shared import Phases
from flywheel.cli.serve import add_port_arguments, apply_overrides, load_deploy_config, serve_until_interrupted
from flywheel.common.settings import Settings, load_settings
from flywheel.protocol.errors import FlywheelError

HELP = "train the digits demo, export it to ONNX and serve it"


def add_parser(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help=HELP, description=__doc__)
    run.add_argument("--config", default="demo",
                     help="deploy config: a YAML file or a packaged preset name (default: demo)")
    run.add_argument("--epochs", type=int, default=15, help="training epochs of the demo model")
    add_port_arguments(run)
    run.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> None:
    from flywheel.registry import Registry
    from flywheel.runtime.extras import require_extra

    require_extra("train", ("torch", "sklearn"), "flywheel run (it trains the demo model)")
    from flywheel.training.digits import register_digits, train_digits

    settings = load_settings()
    cfg = apply_overrides(load_deploy_config(args.config)[0], settings, args.port, args.grpc_port)
    out_dir = os.path.join(settings.home, "work", "digits")
    phases = Phases()
    print(f"training the digits demo model ({args.epochs} epochs) ...", flush=True)
    with phases.phase("train and export to ONNX"):
        result = train_digits(out_dir, epochs=args.epochs)
    print(f"trained: val accuracy {result.val_accuracy:.3f}; ONNX export checked against torch", flush=True)
    registry = Registry.open(settings.registry_uri, settings.artifacts_uri)
    try:
        with phases.phase("register and promote"):
            mv = register_digits(registry, result, actor=settings.actor, epochs=args.epochs)
            registry.promote("digits", mv.version, "staging", actor=settings.actor)
            registry.promote("digits", mv.version, "production", actor=settings.actor)
        print(f"registered {mv.ref} (onnx, safetensors, reference sample) and promoted it to production",
              flush=True)
        print(f"  registry: {settings.registry_uri}   lineage: flywheel models lineage digits@production",
              flush=True)
        with phases.phase("mobile bundle (int8)"):
            _export_demo(registry, mv, settings)
    finally:
        registry.close()
    serve_until_interrupted(cfg, settings, os.path.relpath(result.example_path), phases)


def _export_demo(registry, mv, settings: Settings) -> None:
    """The mobile bundle of the demo: int8 ONNX Runtime mobile format, gated
    and registered as a derivative. A gate failure is reported, not fatal:
    the fp32 model is what gets served."""
    from flywheel.runtime.edge_export import export_bundle
    from flywheel.cli.export import register_bundle, source_from_registry

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
