"""The map's rules, enforced by walking every module's imports (ast):

- arrows point one way (shared/design/ARCHITECTURE.md): each room imports
  only the rooms listed for it in ALLOWED;
- the lower rooms import neither Ray nor a web framework, not even lazily;
- no private name (a module or name starting with ``_``) is imported from
  another room;
- environment variables are read only in flywheel.common.settings;
- importing the public faces of serving, client and protocol loads nothing
  heavy.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

LOWER = {"protocol", "client", "runtime", "kernels", "registry"}
# room -> the rooms it may import (besides itself), lowest first
ALLOWED: dict[str, set[str]] = {
    "protocol": set(),
    "client": {"protocol"},
    "runtime": {"protocol"},
    "kernels": {"protocol"},
    "registry": {"protocol"},
    "configs": set(),
    "common": {"protocol"},
    "training": {"protocol", "client", "runtime", "kernels", "registry", "common", "configs"},
    "loops": {"protocol", "client", "runtime", "kernels", "registry", "common", "configs", "training"},
    "serving": {"protocol", "runtime", "kernels", "registry", "common", "configs", "loops", "training", "client"},
    "batch": {"protocol", "runtime", "kernels", "registry", "common", "configs", "serving"},
    "bench": {"protocol", "client", "runtime", "kernels", "registry", "common", "configs", "serving", "training",
              "batch", "loops"},
    "cli": {"protocol", "client", "runtime", "kernels", "registry", "common", "configs", "serving", "training",
            "batch", "bench", "loops"},
}
RAY_AND_WEB = {"ray", "starlette", "fastapi", "uvicorn", "aiohttp", "flask", "tornado", "sanic", "django",
               "httptools"}
SETTINGS_MODULE = "common/settings.py"
GENERATED = ("_pb2.py", "_pb2_grpc.py")


def _is_private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def _package(rel: str) -> list[str]:
    """The package a module at ``rel`` belongs to, as import path parts."""
    return ["flywheel", *rel[:-3].split("/")[:-1]]


def _imports(tree: ast.AST, rel: str) -> Iterator[tuple[int, str, list[str]]]:
    """(line, module, names imported from it) for every import: relative
    ones resolved against the module's package, ``from flywheel import x``
    as an import of ``flywheel.x``, and ``importlib.import_module("...")``
    with a literal name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = _package(rel)[: len(_package(rel)) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            names = [a.name for a in node.names]
            if module == "flywheel":
                for name in names:
                    yield node.lineno, f"flywheel.{name}", []
            elif module:
                yield node.lineno, module, names
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id == "import_module"))):
            yield node.lineno, node.args[0].value, []


def _environ_names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Names bound to the os module (``import os as o``) and to os.environ
    (``env = os.environ``, ``from os import environ``)."""
    mods, envs = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.asname or a.name for a in node.names if a.name == "os"}
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            envs |= {a.asname or a.name for a in node.names if a.name == "environ"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and _is_environ(node.value, mods, envs):
            envs |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return mods, envs


def _is_environ(node: ast.AST, mods: set[str], envs: set[str]) -> bool:
    if isinstance(node, ast.Name):
        return node.id in envs
    return (isinstance(node, ast.Attribute) and node.attr == "environ"
            and isinstance(node.value, ast.Name) and node.value.id in mods)


# what reads the environment; writing it for processes we start (assignment,
# update, pop, clear, copy-and-restore) is not a read of a setting
_READS = {"get", "setdefault", "items", "keys", "values", "__getitem__", "__contains__"}


def _env_reads(tree: ast.AST) -> Iterator[int]:
    """Lines that read an environment variable: os.getenv, os.environ's
    get / setdefault / items / keys / values, a subscript read, ``in``,
    iteration, ``dict(os.environ)``, ``from os import getenv``, through any
    name bound to os or os.environ."""
    mods, envs = _environ_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if f.attr == "getenv" and isinstance(f.value, ast.Name) and f.value.id in mods:
                yield node.lineno
            elif f.attr in _READS and _is_environ(f.value, mods, envs):
                yield node.lineno
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("dict", "list"):
            if any(_is_environ(a, mods, envs) for a in node.args):
                yield node.lineno
        elif isinstance(node, ast.Subscript) and _is_environ(node.value, mods, envs):
            if isinstance(node.ctx, ast.Load):
                yield node.lineno
        elif isinstance(node, ast.Compare) and any(_is_environ(c, mods, envs) for c in node.comparators):
            yield node.lineno
        elif isinstance(node, (ast.For, ast.comprehension)) and _is_environ(node.iter, mods, envs):
            yield getattr(node, "lineno", getattr(node.iter, "lineno", 0))
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            if any(a.name == "getenv" for a in node.names):
                yield node.lineno


def violations(room: str, rel: str, source: str) -> list[str]:
    """Every rule a module of ``room`` (at ``rel``, relative to the
    repository root) breaks, one line each."""
    tree = ast.parse(source)
    found = []
    for line, module, names in _imports(tree, rel):
        parts = module.split(".")
        if parts[0] in RAY_AND_WEB and room in LOWER:
            found.append(f"{rel}:{line}: imports {module}, but {room}/ may not import Ray or a web framework")
        if parts[0] != "flywheel" or len(parts) < 2:
            continue
        target = parts[1]
        if target == room:
            continue
        if target not in ALLOWED[room]:
            found.append(f"{rel}:{line}: imports flywheel.{target}, against the map: {room}/ may import "
                         f"{', '.join(sorted(ALLOWED[room])) or 'no other room'}")
        private = [p for p in parts[2:] if _is_private(p)] + [n for n in names if _is_private(n)]
        if private:
            found.append(f"{rel}:{line}: imports the private {', '.join(private)} of flywheel.{target} "
                         f"(from {module}); use a public name")
    if rel != SETTINGS_MODULE:
        for line in _env_reads(tree):
            found.append(f"{rel}:{line}: reads an environment variable outside flywheel.common.settings")
    return found


def _package_modules() -> Iterator[tuple[str, Path]]:
    for room in ALLOWED:
        for path in sorted((ROOT / room).rglob("*.py")):
            if not path.name.endswith(GENERATED):
                yield room, path


def test_every_room_is_on_the_map():
    rooms = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert rooms - {"tests"} <= set(ALLOWED)


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_imports_follow_the_rules_of_the_house(room):
    found = []
    for r, path in _package_modules():
        if r == room:
            found += violations(room, str(path.relative_to(ROOT)), path.read_text())
    assert found == []


@pytest.mark.parametrize(
    ("room", "source", "fragment"),
    [
        ("runtime", "from flywheel.serving.config import DeployConfig\n", "against the map"),
        ("registry", "def f():\n    import ray\n", "may not import Ray"),
        ("client", "import starlette.requests\n", "may not import Ray or a web framework"),
        ("serving", "from flywheel.registry._db import connect\n", "the private _db of flywheel.registry"),
        ("bench", "from flywheel.serving.app import _free_port\n", "the private _free_port"),
        ("training", "import os\nx = os.environ.get('X')\n", "reads an environment variable"),
        ("serving", "import os\nx = os.getenv('X')\n", "reads an environment variable"),
        ("runtime", "import os\nx = os.environ['X']\n", "reads an environment variable"),
        ("cli", "import os\nok = 'X' in os.environ\n", "reads an environment variable"),
        ("kernels", "from os import environ\nx = environ['X']\n", "reads an environment variable"),
        ("kernels", "from os import getenv\n", "reads an environment variable"),
        ("serving", "import os as o\nx = o.environ.get('X')\n", "reads an environment variable"),
        ("serving", "import os\nenv = os.environ\nx = env.get('X')\n", "reads an environment variable"),
        ("serving", "import os\nsnapshot = dict(os.environ)\n", "reads an environment variable"),
        ("serving", "import os\nnames = [k for k in os.environ]\n", "reads an environment variable"),
        ("runtime", "from flywheel import serving\n", "against the map"),
        ("runtime", "from ..serving import config\n", "against the map"),
        ("registry", "import importlib\nm = importlib.import_module('ray')\n", "may not import Ray"),
        ("kernels", "from importlib import import_module\nm = import_module('flywheel.training.api')\n",
         "against the map"),
    ],
)
def test_the_checker_catches_each_kind_of_violation(room, source, fragment):
    found = violations(room, f"{room}/example.py", source)
    assert len(found) == 1
    assert fragment in found[0]


def test_the_checker_lets_writes_to_the_environment_pass():
    source = "import os\nos.environ['A'] = '1'\nos.environ.update(B='2')\nsaved = os.environ.copy()\n"
    assert violations("serving", "serving/example.py", source) == []


@pytest.mark.parametrize(
    ("module", "heavy"),
    [
        ("flywheel.serving", ("ray", "torch", "onnxruntime", "tensorrt", "cupy")),
        ("flywheel.client", ("ray", "torch", "onnxruntime", "flywheel.serving", "flywheel.runtime")),
        ("flywheel.protocol", ("ray", "torch", "onnxruntime", "flywheel.serving", "flywheel.runtime")),
    ],
)
def test_public_faces_import_nothing_heavy(module, heavy):
    code = (f"import sys, {module}\n"
            f"print(' '.join(m for m in {heavy!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
