"""``flywheel export <model ref> --target onnx|ort-mobile|executorch [--quantize int8]``.

Resolves a registry reference (``name``, ``name/version``, ``name@alias``),
writes the bundle (flywheel.runtime.edge_export) and registers it as a
derivative of the source version: model ``<name>.<target>`` (``-int8`` when
quantized), lineage parent = the source version, the bundle's files as
artifacts, its parity and latency as metrics. ``--no-register`` only writes.
"""

from __future__ import annotations

import argparse
import json
import os

import msgspec
import numpy as np

from flywheel.runtime.edge_export import QUANTIZE, TARGETS, BundleReport, ExportSource, export_bundle
from flywheel.protocol.errors import ConfigError
from flywheel.runtime.signature import Signature
from flywheel.cli._shared import add_registry_arguments
from flywheel.common.settings import load_settings


def source_from_registry(registry, ref: str) -> tuple[object, ExportSource]:
    """The source version and what a bundle is made from: its ONNX file,
    signature, reference sample (+ labels), architecture and weights. The
    bundle's preprocessing comes from the version's ``preprocessing`` tag (a
    JSON object), where it has one."""
    mv = registry.resolve(ref)
    if "model.onnx" not in mv.artifacts:
        raise ConfigError(f"{mv.ref} has no model.onnx artifact to export")
    path = lambda art: registry.artifact_path(mv.ref, art)[1] if art in mv.artifacts else ""  # noqa: E731
    reference = np.load(path("reference.npy"), allow_pickle=False) if "reference.npy" in mv.artifacts else None
    labels = (np.load(path("reference_labels.npy"), allow_pickle=False)
              if "reference_labels.npy" in mv.artifacts else None)
    params = dict(mv.params)
    architecture = str(params.pop("architecture", ""))
    preprocessing = msgspec.json.decode(mv.tags["preprocessing"]) if "preprocessing" in mv.tags else {}
    source = ExportSource(
        onnx_path=path("model.onnx"), signature=msgspec.convert(mv.signature, Signature), ref=mv.ref,
        reference=reference, labels=labels, architecture=architecture, hparams=params,
        weights_path=path("model.safetensors"), preprocessing=preprocessing,
    )
    return mv, source


def derivative_name(name: str, target: str, quantize: str | None, platform: str | None = None) -> str:
    """<name>.<target>[-int8]; ort-mobile bundles for amd64 get -amd64 (arm,
    the phone default, has no suffix)."""
    return f"{name}.{target}" + (f"-{quantize}" if quantize else "") + (f"-{platform}" if platform == "amd64" else "")


def register_bundle(registry, source_version, report: BundleReport, *, actor: str):
    """Register the bundle's files as a new version of its derivative model,
    with lineage to the source version."""
    from flywheel.registry import Lineage, code_version

    files = sorted(os.listdir(report.path))
    with open(os.path.join(report.path, "metadata.json")) as f:
        platform = json.load(f).get("platform")
    commit, dirty = code_version(os.path.dirname(os.path.abspath(__file__)))
    metrics = {"size_bytes": float(report.size_bytes), "latency_ms_batch1": report.latency_ms_batch1,
               **{f"parity_{k}": float(v) for k, v in report.parity.items() if isinstance(v, (int, float))}}
    return registry.register_version(
        derivative_name(source_version.name, report.target, report.quantize, platform),
        {f: os.path.join(report.path, f) for f in files},
        actor=actor,
        signature=source_version.signature,
        metrics=metrics,
        params={"target": report.target, "quantize": report.quantize or "none", "model_file": report.model_file,
                **({"platform": platform} if platform else {})},
        tags={"derivative": "edge-export", "source": source_version.ref},
        lineage=Lineage(
            data_fingerprint=source_version.lineage.data_fingerprint,
            code_commit=commit,
            code_dirty=dirty,
            training_config={"export": {"target": report.target, "quantize": report.quantize,
                                        "quantization": report.quantization}},
            parent=source_version.ref,
        ),
    )


HELP = "export a registered model as an edge bundle (onnx, ort-mobile, executorch)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help=HELP, description=__doc__)
    p.add_argument("ref", help="registry reference: NAME, NAME/VERSION or NAME@ALIAS")
    p.add_argument("--target", required=True, choices=TARGETS, help="the bundle's format")
    p.add_argument("--quantize", choices=[q for q in QUANTIZE if q], default=None,
                   help="quantize the weights (the bundle is gated on parity with the source)")
    p.add_argument("--platform", choices=["arm", "amd64"], default="arm",
                   help="ort-mobile: the CPU the mobile build targets (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="bundle folder (default: <home>/exports/<name>-<version>-<target>[-int8])")
    p.add_argument("--no-register", action="store_true", help="write the bundle only")
    p.add_argument("--force", action="store_true", help="replace an earlier bundle in the output folder")
    add_registry_arguments(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON at the end")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from flywheel.registry import Registry

    settings = load_settings()
    registry = Registry.open(args.registry, args.artifacts)
    try:
        mv, source = source_from_registry(registry, args.ref)
        suffix = (f"-{args.quantize}" if args.quantize else "") + \
            ("-amd64" if args.target == "ort-mobile" and args.platform == "amd64" else "")
        out = args.out or os.path.join(settings.home, "exports", f"{mv.name}-{mv.version}-{args.target}{suffix}")
        print(f"exporting {mv.ref} to {args.target}{' (' + args.quantize + ')' if args.quantize else ''} -> {out}",
              flush=True)
        report = export_bundle(source, args.target, out, quantize=args.quantize, platform=args.platform,
                               progress=lambda msg: print("  " + msg, flush=True), overwrite=args.force)
        if not args.no_register:
            derived = register_bundle(registry, mv, report, actor=args.actor)
            print(f"registered {derived.ref} (derivative of {mv.ref})", flush=True)
        if args.json:
            print(msgspec.json.encode(report).decode())
    finally:
        registry.close()
