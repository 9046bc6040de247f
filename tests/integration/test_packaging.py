"""What a user gets from the index: the lock resolves there, and the wheel
installs into a fresh venv outside the checkout (through deploy/install.sh,
the images' own install step), without torch, and serves its packaged example.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from _example import check_example_answer
from _ports import answers, free_port, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _lock_check(lock: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "deploy" / "lock.py"), "--check", "--lock", str(lock)],
                          capture_output=True, text=True, timeout=600)


def test_the_lock_resolves_from_the_public_index_alone():
    proc = _lock_check(ROOT / "requirements.lock")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resolve from the public index alone" in proc.stdout


def test_a_pin_only_a_local_wheel_folder_has_fails_the_lock_check(tmp_path):
    lock = tmp_path / "local.lock"
    lock.write_text("torch==2.13.0+cpu\n")
    proc = _lock_check(lock)
    assert proc.returncode != 0
    assert "torch==2.13.0+cpu" in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return next(out.glob("flywheel_ml-*.whl"))


def test_the_wheel_is_flywheel_ml_with_presets_types_and_license(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("flywheel/configs/demo.yaml", "flywheel/configs/example.yaml",
                 "flywheel/configs/examples/linear.onnx", "flywheel/serving/py.typed", "flywheel/runtime/py.typed"):
        assert path in names, path
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_torch_is_a_train_extra_not_a_core_dependency(wheel):
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "Name: flywheel-ml" in meta
    torch_lines = [line for line in meta.splitlines() if line.startswith("Requires-Dist: torch=")]
    assert torch_lines == ['Requires-Dist: torch==2.13.0; extra == "train"']


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    """A new venv, outside the checkout, with the wheel installed by the
    images' install script (core only: no extras)."""
    where = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(where / "venv")], check=True, timeout=120)
    python = where / "venv" / "bin" / "python"
    proc = subprocess.run(
        ["sh", str(ROOT / "deploy" / "install.sh"), str(wheel), str(ROOT / "requirements.lock")],
        cwd=where, env={**os.environ, "PYTHON": str(python)}, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "flywheel-ml 0.1.0" in proc.stdout
    return python


def test_a_serving_install_has_no_torch(fresh_venv):
    proc = subprocess.run([str(fresh_venv), "-c", "import torch"], capture_output=True, text=True, cwd="/")
    assert "No module named 'torch'" in proc.stderr


def test_flywheel_run_on_a_serving_install_names_the_train_extra(fresh_venv, tmp_path):
    proc = subprocess.run([str(fresh_venv.parent / "flywheel"), "run"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "FLYWHEEL_HOME": str(tmp_path / "home")})
    assert proc.returncode == 2
    assert "needs the train extra" in proc.stderr
    assert "pip install 'flywheel-ml[train]'" in proc.stderr


def test_the_installed_command_serves_the_packaged_example(fresh_venv, tmp_path):
    port, grpc_port = free_port(), free_port()
    ray_tmp = tempfile.mkdtemp(prefix="fw-", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "FLYWHEEL_HOME": str(tmp_path / "home"), "RAY_TMPDIR": ray_tmp,
           "FLYWHEEL_RAY_NUM_CPUS": "2", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    flywheel = fresh_venv.parent / "flywheel"
    proc = subprocess.Popen([str(flywheel), "serve", "--config", "example", "--port", str(port),
                             "--grpc-port", str(grpc_port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ready_while_running(url, proc), 180, f"{url}/v2/health/ready")
        check_example_answer(url)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert "stopped." in output
    # where its start-up time went, step by step
    report = output.split("where the time went:", 1)[1].split("\n")[1:7]
    steps = [line.strip().rsplit("  ", 1)[0].strip() for line in report]
    assert steps == ["start Ray", "resolve models and ports", "Serve controller",
                     "deploy the application (replicas load and warm up)", "wait for ready", "total"]


def _ready_while_running(url: str, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"flywheel serve exited with {proc.returncode}: {proc.stdout.read()}")
    return answers(f"{url}/v2/health/ready")
