"""The package layout: root folders import as flywheel.<folder>, never bare."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import flywheel.runtime
import flywheel.serving

ROOT = Path(__file__).resolve().parents[2]


def test_subpackages_live_in_the_root_folders():
    assert Path(flywheel.runtime.__file__).resolve() == ROOT / "runtime" / "__init__.py"
    assert Path(flywheel.serving.__file__).resolve() == ROOT / "serving" / "__init__.py"


def test_bare_import_of_a_root_folder_fails(tmp_path):
    for name in ("runtime", "registry", "serving"):
        proc = subprocess.run(
            [sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True
        )
        assert proc.returncode != 0
        assert "ModuleNotFoundError" in proc.stderr


def test_wheel_build_maps_folders_into_flywheel(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("flywheel_ml-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in ("protocol", "runtime", "kernels", "serving", "training", "registry", "bench", "client", "configs"):
        assert f"flywheel/{pkg}/__init__.py" in names
    assert "flywheel/runtime/batcher.py" in names
    assert not any(n.startswith(("runtime/", "tests/")) for n in names)
