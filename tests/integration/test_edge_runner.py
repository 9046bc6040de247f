"""flywheel-edge-run, built with CMake from the repository's CMakeLists.txt
against the installed ExecuTorch wheel, runs exported programs like
ExecuTorch's Python runtime and like torch.

Needs no Ray (it uses none of this folder's Ray fixtures): integration
because it builds and runs a native binary.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("executorch") is None,
        reason="ExecuTorch is not installed (pip install 'flywheel-ml[edge]')",
    ),
    pytest.mark.skipif(
        shutil.which("cmake") is None or shutil.which(os.environ.get("CXX", "c++")) is None,
        reason="cmake or a C++ compiler is not on PATH",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
MLP = {"in_features": 64, "hidden": [32], "out_features": 10}


@pytest.fixture(scope="session")
def edge_runner(tmp_path_factory) -> Path:
    """The runner, configured and built once per test session."""
    package = Path(importlib.util.find_spec("executorch").submodule_search_locations[0])
    build = tmp_path_factory.mktemp("edge-build")
    started = time.perf_counter()
    for cmd in (
        ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
         f"-DCMAKE_PREFIX_PATH={package / 'lib' / 'cmake'}"],
        ["cmake", "--build", str(build), "-j2"],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    print(f"flywheel-edge-run built in {time.perf_counter() - started:.1f} s")
    binary = build / "flywheel-edge-run"
    assert binary.is_file()
    return binary


def _run(binary: Path, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=120)


def _python_runtime(pte: str, x: np.ndarray) -> np.ndarray:
    from flywheel.runtime.executorch_export import run_executorch

    return run_executorch(pte, [x])[0]


def _write(path: Path, payload: bytes) -> Path:
    path.write_bytes(payload)
    return path


def _npy(path: Path, arr: np.ndarray) -> Path:
    np.save(path, arr)
    return path


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """An MLP (fp32 and int8) and small_cnn (fp32), with their torch modules."""
    import torch

    from flywheel.runtime.architectures import build
    from flywheel.runtime.executorch_export import export_executorch

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("edge-models")
    mlp, mlp_sig = build("mlp", MLP)
    cnn, cnn_sig = build("small_cnn", {})
    calibration = np.random.default_rng(0).random((128, 64), dtype=np.float32)
    return {
        "mlp": (mlp, export_executorch(mlp, mlp_sig, str(out / "mlp.pte"))),
        "cnn": (cnn, export_executorch(cnn, cnn_sig, str(out / "cnn.pte"))),
        "mlp_int8": (mlp, export_executorch(mlp, mlp_sig, str(out / "mlp_int8.pte"),
                                            quantize="int8", calibration=calibration)),
    }


@pytest.mark.parametrize(
    ("name", "shape"),
    [("mlp", (1, 64)), ("mlp", (5, 64)), ("cnn", (20, 1, 8, 8)), ("mlp_int8", (5, 64))],
)
def test_runner_outputs_match_python_runtime_and_torch(edge_runner, programs, tmp_path, name, shape):
    import torch

    module, pte = programs[name]
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    np.save(tmp_path / "input0.npy", x)
    proc = _run(edge_runner, pte, tmp_path, tmp_path / "input0.npy")
    assert proc.returncode == 0, proc.stderr
    got = np.load(tmp_path / "output_0.npy")
    assert got.dtype == np.float32
    assert got.shape == (shape[0], 10)
    assert np.abs(got - _python_runtime(pte, x)).max() <= 1e-5
    if name != "mlp_int8":  # int8 is compared with torch by top-1 agreement in the unit tests
        with torch.no_grad():
            want = module(torch.from_numpy(x)).numpy()
        assert np.abs(got - want).max() <= 1e-5


def test_runner_registers_xnnpack_and_reports_median_latency(edge_runner, programs, tmp_path):
    listed = _run(edge_runner, "--list-backends")
    assert listed.returncode == 0
    assert "XnnpackBackend" in listed.stdout
    np.save(tmp_path / "x.npy", np.zeros((1, 64), np.float32))
    proc = _run(edge_runner, programs["mlp"][1], tmp_path, tmp_path / "x.npy", "--repeat", "20")
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"^median_us=(\d+\.\d+) repeat=20$", proc.stdout, re.M)
    assert match
    assert float(match.group(1)) > 0


def test_npy_versions_2_and_3_are_read(edge_runner, programs, tmp_path):
    x = np.random.default_rng(4).standard_normal((2, 64)).astype(np.float32)
    for version in ((2, 0), (3, 0)):
        src = tmp_path / f"v{version[0]}.npy"
        with open(src, "wb") as f:
            np.lib.format.write_array(f, x, version=version)
        out = tmp_path / f"out{version[0]}"
        out.mkdir()
        proc = _run(edge_runner, programs["mlp"][1], out, src)
        assert proc.returncode == 0, proc.stderr
        assert np.abs(np.load(out / "output_0.npy") - _python_runtime(programs["mlp"][1], x)).max() <= 1e-5


def _forged_header(descr: str, shape: str) -> bytes:
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: _write(d / "text.npy", b"hello, not an array"), "not a .npy file"),
        (lambda d: _npy(d / "f64.npy", np.zeros((1, 64))), "dtype '<f8' is not supported"),
        (lambda d: _npy(d / "be.npy", np.zeros((1, 64), ">f4")), "big-endian"),
        (lambda d: _npy(d / "fortran.npy", np.asfortranarray(np.zeros((3, 64), np.float32))), "Fortran"),
        (lambda d: _write(d / "cut.npy", (d / "ok.npy").read_bytes()[:-7]), "payload is"),
        (lambda d: _npy(d / "wide.npy", np.zeros((1, 65), np.float32)), "does not fit"),
        (lambda d: _npy(d / "rows.npy", np.zeros((65, 64), np.float32)), "does not fit"),
        (lambda d: _npy(d / "i64.npy", np.zeros((1, 64), np.int64)), "the program wants Float"),
        (lambda d: d / "missing.npy", "cannot open"),
        # a forged header whose byte count would wrap: shape (2^61 + 1,) of int64, 8 bytes of payload
        (lambda d: _write(d / "forged.npy", _forged_header("<i8", "(2305843009213693953,)") + bytes(8)),
         "is too large"),
    ],
)
def test_bad_input_file_fails_with_a_clear_message(edge_runner, programs, tmp_path, make, message):
    np.save(tmp_path / "ok.npy", np.zeros((1, 64), np.float32))
    bad = make(tmp_path)
    proc = _run(edge_runner, programs["mlp"][1], tmp_path, bad)
    assert proc.returncode == 2
    assert "flywheel-edge-run: error:" in proc.stderr, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert not (tmp_path / "output_0.npy").exists()


def test_usage_errors_exit_2(edge_runner, programs, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 64), np.float32))
    assert _run(edge_runner, programs["mlp"][1], tmp_path).returncode == 2
    proc = _run(edge_runner, programs["mlp"][1], tmp_path, tmp_path / "x.npy", "--repeat", "0")
    assert proc.returncode == 2
    assert "--repeat must be a positive integer" in proc.stderr
    proc = _run(edge_runner, programs["mlp"][1], tmp_path / "nope", tmp_path / "x.npy")
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr
    proc = _run(edge_runner, tmp_path / "x.npy", tmp_path, tmp_path / "x.npy")
    assert proc.returncode == 1
    assert "cannot load program" in proc.stderr
