"""Build the ``flywheel-client`` wheel: the Python client without the server.

    python deploy/client_wheel.py [--out dist]

It holds ``flywheel.client`` and ``flywheel.protocol`` (the wire layer the
client and the server share) and needs only NumPy and msgspec; its ``grpc``
extra adds grpcio and protobuf for the gRPC client. No Ray, no torch, no
ONNX Runtime: an application that only calls a Flywheel (or any V2) server
installs this (``pip install flywheel-client[grpc]``).

Both distributions come from this one tree, so the client's files are staged
with a pyproject of their own in a temporary folder and built there; its
version and dependency ranges are read from pyproject.toml, so they never
drift from the server's.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "flywheel-client"
# import package -> folder of this tree
PACKAGES = {
    "flywheel.client": "client",
    "flywheel.protocol": "protocol",
    "flywheel.protocol.proto": "protocol/proto",
}
REQUIRES = ("numpy", "msgspec")
GRPC_REQUIRES = ("grpcio", "protobuf")


def _requirement(project: dict, name: str) -> str:
    """The server's requirement for ``name``, so both ask for the same range."""
    for req in project["dependencies"]:
        if re.match(rf"{re.escape(name)}\b(?![-\w])", req):
            return req
    raise SystemExit(f"pyproject.toml does not require {name}: the client's dependencies come from there")


def pyproject(project: dict) -> str:
    """The client distribution's pyproject.toml."""
    reqs = ", ".join(f'"{_requirement(project, n)}"' for n in REQUIRES)
    grpc = ", ".join(f'"{_requirement(project, n)}"' for n in GRPC_REQUIRES)
    package_dir = ", ".join(f'"{pkg}" = "{path}"' for pkg, path in PACKAGES.items())
    packages = ", ".join(f'"{pkg}"' for pkg in PACKAGES)
    return f"""\
[build-system]
requires = ["setuptools>=77", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "{NAME}"
version = "{project['version']}"
description = "Python client for Flywheel and other V2 (Open Inference Protocol) servers: HTTP and gRPC"
requires-python = "{project['requires-python']}"
license = "{project['license']}"
dependencies = [{reqs}]

[project.optional-dependencies]
grpc = [{grpc}]

[tool.setuptools]
package-dir = {{ {package_dir} }}
packages = [{packages}]

[tool.setuptools.package-data]
"*" = ["py.typed"]
"flywheel.protocol.proto" = ["*.proto"]
"""


def build(out: Path) -> Path:
    """Build the wheel into ``out``; returns its path."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flywheel-client-") as tmp:
        stage = Path(tmp)
        for folder in {path.split("/")[0] for path in PACKAGES.values()}:
            shutil.copytree(ROOT / folder, stage / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (stage / "pyproject.toml").write_text(pyproject(project))
        (stage / "LICENSE").write_text((ROOT / "LICENSE").read_text())
        before = set(out.glob("flywheel_client-*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "-w", str(out), str(stage)], check=True)
    wheel = out / f"flywheel_client-{project['version']}-py3-none-any.whl"
    if not wheel.exists():
        raise SystemExit(f"pip wrote {sorted(set(out.glob('flywheel_client-*.whl')) - before)}, not {wheel.name}")
    return wheel


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "dist"), help="folder for the wheel (default: dist/)")
    args = ap.parse_args(argv)
    print(build(Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
