"""The backend registry: backend names -> what builds, configures and checks them.

A backend is a :class:`BackendSpec`. The built-in ones are listed in
``_BUILTIN`` as ``module:attribute`` paths; other packages add theirs through
the ``flywheel.backends`` entry point group, e.g. in their pyproject.toml::

    [project.entry-points."flywheel.backends"]
    mybackend = "my_package.flywheel_backend:SPEC"

Nothing is imported until a name is asked for (:func:`get_backend`), and the
built-in modules import their heavy runtimes (onnxruntime, torch, TensorRT,
CuPy) only when a model loads, so importing this module or the model config
that uses it stays cheap.

A model config (``flywheel.serving.config.ModelConfig``) takes from here its
``backend:`` names, the top-level fields the built-in backends add
(``onnxruntime:``, ``tensorrt:``, ``architecture:`` / ``hparams:``,
``python:``), and their
cross-field checks; a plug-in backend's own settings arrive as the model's
``settings:`` mapping, validated by the spec's ``settings`` type.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from flywheel.protocol.errors import ConfigError
from flywheel.runtime.backends.base import Backend

__all__ = [
    "ENTRY_POINT_GROUP",
    "BackendSpec",
    "ConfigField",
    "available_backends",
    "builtin_fields",
    "builtin_specs",
    "get_backend",
]

ENTRY_POINT_GROUP = "flywheel.backends"

# name -> "module:attribute" of its BackendSpec. A new built-in backend is one
# module in this folder plus one line here; the order is the order error
# messages list them in.
_BUILTIN = {
    "onnxruntime": "flywheel.runtime.backends.onnx_backend:SPEC",
    "torch": "flywheel.runtime.backends.torch_backend:SPEC",
    "tensorrt": "flywheel.runtime.backends.tensorrt_backend:SPEC",
    "python": "flywheel.runtime.backends.python_backend:SPEC",
}


@dataclass(frozen=True)
class ConfigField:
    """A top-level model-config field that a built-in backend adds.

    name / type / default: the field as the model config declares it (the
        type is anything msgspec can decode; the default must be immutable
        or an empty container).
    exclusive: a value other than the default given while the model names
        another backend is refused (``tensorrt:``). False where the field is
        ignored by other backends instead, as ``onnxruntime:`` and
        ``architecture:`` always were, so that a config switched between
        backends keeps loading.
    """

    name: str
    type: Any
    default: Any
    exclusive: bool = True


@dataclass(frozen=True)
class BackendSpec:
    """Everything the rest of Flywheel knows about one backend.

    name: what a model config's ``backend:`` says.
    create: ``(model_file, model_config) -> Backend``, not yet loaded; cheap
        (it checks arguments, imports no heavy runtime). ``model_config`` is
        the validated ``ModelConfig``: read the fields this spec adds, or
        ``model_config.settings`` decoded with :meth:`parse_settings`.
    summary: one line for error messages and docs (what file it loads).
    fields: top-level model-config fields this backend adds. Built-in
        backends only: a plug-in is found after the config type is made, so
        its settings go under ``settings:`` instead (see ``settings``).
    settings: a ``msgspec.Struct`` type for the model's ``settings:`` mapping
        (None: the backend takes no ``settings:``). Use
        ``forbid_unknown_fields=True`` so that typos are refused.
    validate: ``(model_config) -> None``: cross-field checks run when a model
        config is made; raise ConfigError naming the field (the model's name
        is prefixed to the message).
    gpus: GPUs a Ray replica that loads this backend asks for (a TensorRT
        engine runs on a GPU only), or ``(model_config) -> float`` where it
        depends on the model's settings (ONNX Runtime's CUDA provider).
    folder: the backend loads a folder, not one file: a model's ``path`` names
        a folder, and a registry ``ref`` gives every artifact of the version
        in one folder (``Registry.version_folder``) instead of ``artifact``.
    """

    name: str
    create: Callable[[str, Any], Backend]
    summary: str = ""
    fields: tuple[ConfigField, ...] = ()
    settings: type | None = None
    validate: Callable[[Any], None] | None = None
    gpus: float | Callable[[Any], float] = 0
    folder: bool = False

    def gpus_for(self, model_config: Any) -> float:
        """GPUs a replica loading ``model_config`` with this backend needs."""
        return float(self.gpus(model_config)) if callable(self.gpus) else float(self.gpus)

    def parse_settings(self, raw: Any) -> Any:
        """``raw`` (a model's ``settings:`` mapping) as this spec's settings
        type; ConfigError naming ``settings`` when it does not fit."""
        if self.settings is None:
            if raw:
                raise ConfigError(f"settings: backend {self.name!r} takes none")
            return None
        try:
            return msgspec.convert(raw or {}, self.settings, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"settings of backend {self.name!r}: {exc}") from None


_lock = threading.Lock()
_loaded: dict[str, BackendSpec] = {}


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    # read on every call, not cached: a package installed (or a folder put on
    # sys.path) after start-up is seen; built-in names cannot be taken over
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _BUILTIN:
            found.setdefault(ep.name, ep)
    return found


def available_backends() -> list[str]:
    """Names of every backend: the built-in ones, then the installed plug-ins
    (sorted). Loads nothing."""
    return [*_BUILTIN, *sorted(_entry_points())]


def _import(target: str) -> object:
    module, _, attr = target.partition(":")
    obj: object = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def _load(name: str) -> BackendSpec:
    if name in _BUILTIN:
        spec = _import(_BUILTIN[name])
        source = _BUILTIN[name]
    else:
        ep = _entry_points().get(name)
        if ep is None:
            # the list holds the installed plug-ins too: one missing from it is not installed
            raise ConfigError(f"backend {name!r} unknown; allowed: {', '.join(available_backends())}")
        source = f"entry point {ep.value!r}" + (f" of {ep.dist.name}" if ep.dist else "")
        try:
            spec = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in: say which, keep the cause
            raise ConfigError(f"backend {name!r}: cannot load {source}: {exc!r}") from exc
    if not isinstance(spec, BackendSpec):
        raise ConfigError(f"backend {name!r}: {source} is a {type(spec).__name__}, not a BackendSpec")
    if spec.name != name:
        raise ConfigError(f"backend {name!r}: {source} names itself {spec.name!r}")
    if spec.fields and name not in _BUILTIN:
        raise ConfigError(
            f"backend {name!r}: a plug-in backend cannot add model-config fields "
            f"({', '.join(f.name for f in spec.fields)}); take them as `settings:` (BackendSpec.settings)"
        )
    return spec


def get_backend(name: str) -> BackendSpec:
    """The spec of backend ``name``, imported (once) on first use.

    Raises ConfigError when no backend has that name (the message lists the
    available ones) or when a plug-in's entry point cannot be loaded or does
    not hold a BackendSpec of that name. Thread-safe.
    """
    spec = _loaded.get(name)
    if spec is not None:
        return spec
    with _lock:
        spec = _loaded.get(name)
        if spec is None:
            spec = _loaded[name] = _load(name)
    return spec


def builtin_fields() -> list[tuple[str, Any, Any]]:
    """``(name, type, default)`` of every model-config field the built-in
    backends add, for ``msgspec.defstruct``. Imports the built-in backend
    modules (none of which imports its runtime at module level)."""
    out = []
    for name in _BUILTIN:
        out.extend((f.name, f.type, f.default) for f in get_backend(name).fields)
    return out


def builtin_specs() -> list[BackendSpec]:
    """The built-in backends' specs, in registration order."""
    return [get_backend(name) for name in _BUILTIN]
