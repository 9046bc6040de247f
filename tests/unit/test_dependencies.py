"""pyproject.toml declares what the code imports, and nothing it does not:
every third-party import of the package is a declared dependency (core or an
extra); what serving imports at module level is core (a serving install has
no extras); every declared dependency is imported somewhere, or says here why
not."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import distributions, packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ["protocol", "runtime", "kernels", "serving", "training", "registry", "bench", "client", "configs", "batch", "loops"]
# what a serving-only install (no extras) imports when it loads these rooms
SERVING = ["protocol", "runtime", "kernels", "serving", "registry", "client", "configs", "loops"]
# modules of optional GPU packages that are not installed here
NOT_INSTALLED = {"cupy": "cupy-cuda12x", "tensorrt": "tensorrt"}
# declared but never imported by name, and why
USED_WITHOUT_IMPORT = {
    "onnxscript": "torch.onnx.export's exporter needs it",
    "s3fs": "fsspec loads it for s3:// URIs",
    "moto": "tests/s3.py runs its server as `python -m moto.server`",
    "onnxruntime-gpu": "it installs the module onnxruntime, in the place of onnxruntime's",
    "xgboost": "macOS's name for xgboost-cpu (the convert extra): the same module, xgboost",
}
# dev tools that live in the package but only run by hand
DEV_SCRIPTS = {"protocol/proto/generate.py"}
# scripts a benchmark runs with a peer's own virtual environment (its pins do
# not fit ours), and what that environment is
OTHER_ENVIRONMENTS = {"bench/alibi_ref.py": "alibi-detect 0.13 in .venv-alibi (make bench-alibi)",
                      "bench/kserve_ref.py": "KServe 0.21 in .venv-kserve (make bench-kserve)"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.match(r"[A-Za-z0-9_.-]+", req).group(0))


@pytest.fixture(scope="module")
def declared() -> dict[str, set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"core": {_requirement_name(r) for r in project["dependencies"]}}
    for extra, reqs in project["optional-dependencies"].items():
        groups[extra] = {_requirement_name(r) for r in reqs} - {"flywheel-ml"}
    return groups


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(dotted module, imported at module level) for each absolute import."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # each name may be a submodule (``from opentelemetry import trace``)
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            found.append((name, id(node) in top_level))
    return found


def _namespace_owners(shared: set[str]) -> dict[str, set[str]]:
    """dotted package -> the distributions with files in it, under the
    top-level names that several distributions share (``opentelemetry``:
    the api, the sdk and the exporters each install part of it)."""
    owners: dict[str, set[str]] = {}
    for dist in distributions():
        if not dist.metadata["Name"]:  # a broken install's leftovers
            continue
        for f in dist.files or ():
            parts = f.parts
            if len(parts) > 1 and parts[0] in shared and f.suffix == ".py":
                for i in range(1, len(parts)):
                    owners.setdefault(".".join(parts[:i]), set()).add(_norm(dist.metadata["Name"]))
    return owners


def _distribution(module: str, dists: dict[str, list[str]], owners: dict[str, set[str]]) -> str | None:
    """The distribution an import of ``module`` (dotted) comes from: the
    longest package of it that one distribution alone provides, for a shared
    namespace; else the one its top-level name maps to."""
    parts = module.split(".")
    for i in range(len(parts), 1, -1):
        who = owners.get(".".join(parts[:i]))
        if who is not None and len(who) == 1:
            return next(iter(who))
    names = dists.get(parts[0])
    return _norm(names[0]) if names else None


def _third_party(folders: list[str], skip: set[str] = frozenset()) -> dict[str, list[tuple[str, bool]]]:
    """distribution -> [(file, at module level)] for the files under ``folders``."""
    dists = packages_distributions()
    owners = _namespace_owners({top for top, names in dists.items() if len(names) > 1 and top != "google"})
    # the tests' own helper modules (tests/pg.py, tests/integration/_ports.py, ...)
    local = {path.stem for path in (ROOT / "tests").rglob("*.py")}
    out: dict[str, list[tuple[str, bool]]] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel in skip or path.name.endswith("_pb2.py") or path.name.endswith("_pb2_grpc.py"):
                continue
            for dotted, at_top in _imports(path):
                module = dotted.split(".")[0]
                if module in sys.stdlib_module_names or module in local or module == "flywheel":
                    continue
                if module in NOT_INSTALLED:
                    dist = _norm(NOT_INSTALLED[module])
                else:
                    dist = _distribution(dotted, dists, owners)
                assert dist, f"{rel} imports {module!r}, which no installed distribution provides"
                # google.* is shared by several distributions; ours is protobuf
                dist = "protobuf" if module == "google" else dist
                out.setdefault(dist, []).append((rel, at_top))
    return out


def test_every_third_party_import_is_declared(declared):
    every = set().union(*declared.values())
    found = _third_party(PACKAGE, set(OTHER_ENVIRONMENTS))
    undeclared = {dist: sorted({f for f, _ in where}) for dist, where in found.items()
                  if dist not in every}
    assert undeclared == {}


def test_serving_imports_only_core_dependencies_at_module_level(declared):
    extra_only = {dist: sorted(f for f, top in where if top) for dist, where in _third_party(SERVING, DEV_SCRIPTS).items()
                  if dist not in declared["core"]}
    assert {d: files for d, files in extra_only.items() if files} == {}


def test_every_declared_dependency_is_imported_or_says_why_not(declared):
    imported = set(_third_party(PACKAGE, set(OTHER_ENVIRONMENTS))) | set(_third_party(["tests"]))
    unused = {dist for deps in declared.values() for dist in deps
              if dist not in imported and dist not in USED_WITHOUT_IMPORT}
    assert unused == set()


def test_torch_is_not_a_core_dependency(declared):
    assert "torch" not in declared["core"]
    assert "torch" in declared["train"]


def test_a_missing_extra_is_named_with_its_install_command():
    from flywheel.protocol.errors import ConfigError
    from flywheel.runtime.extras import require_extra

    with pytest.raises(ConfigError, match=r"flywheel run needs the train extra \(no_such_module_xyz not "
                                          r"installed\): pip install 'flywheel-ml\[train\]'"):
        require_extra("train", ("numpy", "no_such_module_xyz"), "flywheel run")
