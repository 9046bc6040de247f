"""The drift-test registry: test name -> :class:`DriftTest` class.

The detector and the serving monitor find tests here by name, never by a
string branch. The built-in tests are listed by import path and imported on
first use, so listing names (as config validation does) imports no kernels.
Adding a test is one module with a ``DriftTest`` subclass plus one
registration: a line in ``BUILTIN`` for a test that ships with Flywheel,
:func:`register_test` at run time, or an entry point in the group
``flywheel.drift_tests`` (``name = "package.module:Class"``) for a test in
another package, which every process (Ray workers included) finds by itself.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import threading

from flywheel.kernels.drift.base import KERNEL_BACKENDS, KINDS, DriftTest
from flywheel.protocol.errors import AlreadyExistsError, ConfigError

ENTRY_POINT_GROUP = "flywheel.drift_tests"

# name -> "module:Class", in the order tests are listed
BUILTIN: dict[str, str] = {
    "ks": "flywheel.kernels.drift.ks:KSTest",
    "cvm": "flywheel.kernels.drift.cvm:CvMTest",
    "chi2": "flywheel.kernels.drift.chi2:Chi2Test",
    "psi": "flywheel.kernels.drift.psi:PSITest",
    "mmd": "flywheel.kernels.drift.mmd:MMDTest",
}

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_lock = threading.Lock()
_registered: dict[str, type[DriftTest]] = {}  # by register_test
_loaded: dict[str, type[DriftTest]] = {}  # "module:Class" -> class, once imported
_entry_points: dict[str, str] | None = None  # found on first use


def _plugin_paths() -> dict[str, str]:
    global _entry_points
    if _entry_points is None:
        found = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
        _entry_points = {name: path for name, path in found.items() if name not in BUILTIN}
    return _entry_points


def available_tests() -> tuple[str, ...]:
    """Every test a detector can run: built-in, then entry points, then
    those registered at run time."""
    names = [*BUILTIN, *_plugin_paths()]
    return (*names, *(n for n in _registered if n not in names))


def _check(cls: type, name: str) -> type[DriftTest]:
    if not (isinstance(cls, type) and issubclass(cls, DriftTest)):
        raise ConfigError(f"drift test {name!r}: {cls!r} is not a DriftTest subclass")
    if getattr(cls, "name", None) != name:
        raise ConfigError(f"drift test {name!r}: its class says name = {getattr(cls, 'name', None)!r}")
    if getattr(cls, "kind", None) not in KINDS:
        raise ConfigError(f"drift test {name!r}: kind must be one of {KINDS}")
    missing = [b for b in cls.backends if b not in KERNEL_BACKENDS or not callable(getattr(cls, f"score_{b}", None))]
    if not cls.backends or missing:
        raise ConfigError(
            f"drift test {name!r}: backends {cls.backends} must be among {KERNEL_BACKENDS}, "
            "each with a score_<backend> method"
        )
    return cls


def register_test(cls: type[DriftTest]) -> type[DriftTest]:
    """Make ``cls`` available under ``cls.name`` in this process (usable as
    a class decorator). Raises ConfigError for a class that does not fit the
    interface and AlreadyExistsError for a name already taken."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"drift test name {name!r} must match {_NAME.pattern}")
    _check(cls, name)
    with _lock:
        if name in available_tests():
            raise AlreadyExistsError(f"drift test {name!r} is already registered")
        _registered[name] = cls
    return cls


def unregister_test(name: str) -> None:
    """Forget a test registered with :func:`register_test` (built-in and
    entry-point tests stay)."""
    with _lock:
        _registered.pop(name, None)


def get_test(name: str) -> type[DriftTest]:
    """The class of the test called ``name``; ConfigError naming the known
    tests when there is none."""
    if name in _registered:
        return _registered[name]
    path = BUILTIN.get(name) or _plugin_paths().get(name)
    if path is None:
        raise ConfigError(f"test {name!r} must be one of {available_tests()}")
    cls = _loaded.get(path)
    if cls is None:
        module, _, attr = path.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"drift test {name!r} ({path}) cannot be loaded: {exc}") from exc
        _loaded[path] = cls = _check(cls, name)
    return cls
