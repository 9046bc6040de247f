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
    for pkg in ("protocol", "runtime", "runtime/backends", "kernels", "kernels/drift", "serving", "training",
                "registry", "bench", "client", "configs", "common", "cli"):
        assert f"flywheel/{pkg}/__init__.py" in names
    # `python -m flywheel`, while flywheel stays a namespace package
    assert "flywheel/__main__.py" in names
    assert "flywheel/__init__.py" not in names
    assert "flywheel/runtime/batcher.py" in names
    assert not any(n.startswith(("runtime/", "tests/")) for n in names)


def test_every_folder_of_python_modules_is_a_package_of_the_wheel():
    """pyproject.toml lists packages explicitly: a new sub-folder left out of
    the list would be missing from the wheel while every test here passes."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {path: pkg for pkg, path in setup["package-dir"].items()}
    listed = set(setup["packages"])
    missing = []
    for top, pkg in folders.items():
        if "/" in top:
            continue
        for sub in sorted((ROOT / top).rglob("*.py")):
            rel = sub.parent.relative_to(ROOT).as_posix()
            name = folders.get(rel) or pkg + rel[len(top):].replace("/", ".")
            if "__pycache__" not in rel and name not in listed:
                missing.append(f"{rel} ({name})")
    assert sorted(set(missing)) == []
