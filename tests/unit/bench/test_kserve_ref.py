"""KServe as the latency bench's peer (bench/kserve_ref.py, bench/latency.py):
whether its environment is there, and its gRPC target read from the pairs.
No server is started."""

from __future__ import annotations

import os

from flywheel.bench import interleave as il
from flywheel.bench.kserve_ref import installed
from flywheel.bench.latency import _summary, comparison
from flywheel.bench.loadgen import LoadResult
from flywheel.common.settings import load_settings


def _result(rps: float, p50_ms: float, c: int = 32) -> LoadResult:
    return LoadResult(c, 1.0, [p50_ms / 1e3] * int(rps))


def _fake_venv(root, with_kserve: bool) -> str:
    os.makedirs(root / "bin")
    python = root / "bin" / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    if with_kserve:
        pkg = root / "lib" / "python3.11" / "site-packages" / "kserve"
        os.makedirs(pkg)
        (pkg / "model_server.py").write_text("")
    return str(root)


def test_a_venv_without_kserve_is_not_installed(tmp_path):
    assert not installed(_fake_venv(tmp_path / "v", with_kserve=False))


def test_a_venv_with_kserve_is_installed(tmp_path):
    assert installed(_fake_venv(tmp_path / "v", with_kserve=True))


def test_no_venv_is_not_installed(tmp_path):
    assert not installed(str(tmp_path / "missing"))


def test_the_venv_comes_from_settings():
    assert load_settings({}).kserve_venv == ".venv-kserve"
    assert load_settings({"FLYWHEEL_KSERVE_VENV": "/opt/ks"}).kserve_venv == "/opt/ks"


def test_grpc_target_is_five_times_kserve_from_the_pairs():
    blocks = il.run_blocks(2, lambda: _result(1000, 2.0), lambda: _result(4000, 0.5))
    rec = comparison("kserve", "flywheel", "grpc", 32, blocks, 2, 1.0)
    target = next(x for x in _summary([], [rec], 32) if ">= 5x kserve" in x)
    assert target.strip().startswith("MISS")
    assert "x4.0" in target


def test_kserve_has_no_http_target():
    blocks = il.run_blocks(1, lambda: _result(100, 2.0), lambda: _result(4000, 0.5))
    rec = comparison("kserve", "flywheel", "http json", 32, blocks, 1, 1.0)
    assert not any("kserve" in x for x in _summary([], [rec], 32) if x.strip().startswith(("met", "MISS")))
