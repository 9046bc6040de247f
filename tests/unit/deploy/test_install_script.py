"""deploy/install.sh's branches (the images' install step), with a stand-in
Python that records what it is asked to run. The plain branch also runs for
real in a fresh venv (tests/integration/test_packaging.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
STUB = """#!/bin/sh
echo "$*" >> "$STUB_LOG"
case "$1" in
  -c) case "$2" in *sys.executable*) echo "$0" ;; *onnxruntime-gpu*) echo 1.31.1 ;; esac ;;
esac
"""


@pytest.fixture
def env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python", STUB), ("flywheel", "#!/bin/sh\necho flywheel-ml 0.1.0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "flywheel_ml-0.1.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "requirements.lock").write_text("numpy==2.4.6\ntorch==2.13.0\n")
    return {**os.environ, "PYTHON": str(bin_dir / "python"), "STUB_LOG": str(tmp_path / "calls.log")}


def _install(tmp_path, env, extras: str, **extra_env) -> tuple[subprocess.CompletedProcess, list[str]]:
    proc = subprocess.run(
        ["sh", str(ROOT / "deploy" / "install.sh"), str(tmp_path / "flywheel_ml-0.1.0-py3-none-any.whl"),
         str(tmp_path / "requirements.lock"), extras],
        env={**env, **extra_env}, capture_output=True, text=True, timeout=60,
    )
    log = Path(env["STUB_LOG"])
    return proc, log.read_text().splitlines() if log.exists() else []


def _pip_calls(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("-m pip")]


def test_train_with_a_torch_index_takes_torch_alone_from_it_first(tmp_path, env):
    proc, calls = _install(tmp_path, env, "train,s3", TORCH_INDEX_URL="https://torch.example/cpu")
    assert proc.returncode == 0, proc.stderr
    first, second = _pip_calls(calls)
    assert first == "-m pip install --quiet --no-deps --index-url https://torch.example/cpu torch==2.13.0"
    assert second.endswith(f"-c {tmp_path}/requirements.lock {tmp_path}/flywheel_ml-0.1.0-py3-none-any.whl[train,s3]")


def test_without_a_torch_index_the_lock_alone_decides(tmp_path, env):
    proc, calls = _install(tmp_path, env, "train")
    assert proc.returncode == 0, proc.stderr
    assert len(_pip_calls(calls)) == 1


def test_gpu_puts_onnxruntime_gpu_in_the_place_of_onnxruntime(tmp_path, env):
    proc, calls = _install(tmp_path, env, "gpu")
    assert proc.returncode == 0, proc.stderr
    _, uninstall, reinstall = _pip_calls(calls)
    assert uninstall == "-m pip uninstall --quiet --yes onnxruntime"
    assert reinstall == "-m pip install --quiet --force-reinstall --no-deps onnxruntime-gpu==1.31.1"


def test_a_lock_without_a_torch_pin_stops_with_a_message(tmp_path, env):
    (tmp_path / "requirements.lock").write_text("numpy==2.4.6\n")
    proc, _ = _install(tmp_path, env, "train", TORCH_INDEX_URL="https://torch.example/cpu")
    assert proc.returncode == 2
    assert "no torch pin" in proc.stderr


def test_it_ends_by_naming_the_installed_flywheel(tmp_path, env):
    proc, _ = _install(tmp_path, env, "")
    assert proc.stdout.strip() == "flywheel-ml 0.1.0"
