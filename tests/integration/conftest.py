"""One local Ray per test session, shared by every integration test.

Ray starts once (about 5 s here), with its own temp folder, no dashboard
(serving does not need it) and explicit auth mode; it is shut down at the end.
The demo deployment (the digits model of configs/demo.yaml, trained briefly)
is deployed once on a free port and shared too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import msgspec
import pytest

from flywheel.common import load_settings, start_ray
from flywheel.serving import load_config
from flywheel.serving.app import deploy, undeploy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hosts():
    """Two "hosts" as network namespaces on a bridge (flywheel/bench/netns.py),
    per module of the multi-node tests; they skip where none can be made."""
    from flywheel.bench.netns import Hosts, NetnsUnavailable

    try:
        made = Hosts(2)
    except NetnsUnavailable as exc:
        pytest.skip(f"no network namespaces here: {exc}")
    yield made
    made.close()


@pytest.fixture(scope="session")
def ray_session():
    import ray
    from ray import serve

    # Ray Train's controller polls its workers every 2 s by default, and
    # every start, finish and failure of a training run waits for a poll;
    # the processes Ray starts inherit this (RAY-NOTES.md, Ray Train)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    tmp = tempfile.mkdtemp(prefix="fw-ray-", dir="/tmp")  # short: Ray's socket paths
    settings = msgspec.structs.replace(load_settings(), ray_tmpdir=tmp, ray_address="")
    # 4 logical CPUs on 2 cores: deployments ask for fractions, and no test
    # may wait on a CPU that a leftover replica holds.
    start_ray(settings, num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory):
    from flywheel.training.digits import train_digits

    out = tmp_path_factory.mktemp("digits")
    return train_digits(str(out), epochs=3, progress=None)


@pytest.fixture(scope="session")
def demo_registry(digits_model, tmp_path_factory):
    """A real SQLite registry holding the trained digits model in production,
    as `make run` leaves it."""
    from flywheel.serving.config import RegistryConfig

    from _digits import digits_in_production

    uri, artifacts = digits_in_production(tmp_path_factory.mktemp("flywheel-home"), digits_model)
    return RegistryConfig(uri=uri, artifacts=artifacts)


@pytest.fixture(scope="session")
def demo(ray_session, demo_registry, multi_type_onnx):
    """The demo preset as it is (digits@production from the registry), on
    free ports; plus a ``types`` model (identity for every V2 datatype) for
    the wire tests."""
    from flywheel.serving import ModelConfig

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    types = ModelConfig(name="types", path=multi_type_onnx, num_cpus=0.1)
    server = msgspec.structs.replace(cfg.server, port=0, grpc_port=0)
    cfg = msgspec.structs.replace(cfg, models=[*cfg.models, types], server=server, registry=demo_registry)
    dep = deploy(cfg)
    yield dep
    undeploy(dep)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_uri(request, tmp_path):
    """A fresh registry database: a SQLite file, then a PostgreSQL database
    (the tests' own server; those variants skip without its binaries)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/registry.db"
    return request.getfixturevalue("postgres").new_database()
