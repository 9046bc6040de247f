"""Pieces the benchmark scripts share: model export and a throwaway deployment."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


def free_port() -> int:
    """A TCP port free on loopback now (for a server a benchmark starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_model(arch: str, hparams: dict, path: str) -> str:
    """An untrained (seeded) architecture exported to ONNX at ``path``."""
    import torch

    from flywheel.runtime.architectures import build
    from flywheel.runtime.export import export_onnx

    torch.manual_seed(0)
    module, sig = build(arch, hparams)
    return export_onnx(module, sig, path)


@contextlib.contextmanager
def bench_deployment(name: str, models: list[dict]) -> Iterator:
    """Start a local Ray (4 logical CPUs), deploy ``models`` on free loopback
    ports, yield the Deployment, and tear everything down afterwards."""
    import msgspec
    import ray
    from ray import serve

    from flywheel.common import load_settings, start_ray
    from flywheel.serving import parse_config
    from flywheel.serving.app import deploy, undeploy

    cfg = parse_config({"name": name, "server": {"port": 0, "grpc_port": 0}, "models": models})
    start_ray(msgspec.structs.replace(load_settings(), ray_address=""), num_cpus=4, log_to_driver=False)
    try:
        dep = deploy(cfg)
        try:
            yield dep
        finally:
            undeploy(dep)
    finally:
        serve.shutdown()
        ray.shutdown()
