"""User Python code named by a model config: finding its class, and checking
what it returns.

Shared by the python backend (``backend: python``, a user class is the
model) and the pre/post-processing steps (``preprocess:`` /
``postprocess:``, user classes around a model): both import a class named
``module:Qual.Name`` from the model's folder or the installed packages, and
both hold what the class returns to a declared list of tensors.

What is trusted: only a class that a deploy config names is imported. The
model's folder is on ``sys.path`` only while that module imports, and the
modules imported from it are taken out of ``sys.modules`` again, so two
models (two versions of one) may each ship a ``model.py``. Nothing is
unpickled.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import threading
from collections.abc import Mapping, Sequence

import msgspec
import numpy as np

from flywheel.protocol.datatypes import V2_DATATYPES, numpy_dtype, v2_datatype
from flywheel.protocol.errors import ConfigError, FlywheelError
from flywheel.runtime.backends.base import Backend
from flywheel.runtime.signature import TensorSpec

__all__ = ["CLASS_PATH", "UserTensor", "check_class_path", "check_outputs", "check_tensors", "import_class",
           "model_files"]

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
CLASS_PATH = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")

# sys.path and sys.modules belong to the whole process: one model's import
# from its folder at a time
_import_lock = threading.Lock()


class UserTensor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One declared tensor: V2 ``{name, datatype, shape}`` (-1 = any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.datatype, tuple(self.shape))


def check_class_path(field: str, target: str) -> None:
    """ConfigError naming ``field`` unless ``target`` is ``module:ClassName``."""
    if not target:
        raise ConfigError(f"{field} is required: 'module:ClassName'")
    if not CLASS_PATH.match(target):
        raise ConfigError(f"{field} {target!r} must be 'module:ClassName' (e.g. 'my_model:MyModel')")


def check_tensors(field: str, tensors: Sequence[UserTensor]) -> None:
    """Names unique and non-empty, datatypes V2, dims >= -1; ConfigError
    naming ``field[i]`` otherwise."""
    seen: set[str] = set()
    for i, t in enumerate(tensors):
        where = f"{field}[{i}]"
        if not t.name:
            raise ConfigError(f"{where}.name must not be empty")
        if t.name in seen:
            raise ConfigError(f"{where}.name {t.name!r} is given twice")
        seen.add(t.name)
        if t.datatype not in V2_DATATYPES:
            raise ConfigError(f"{where}.datatype {t.datatype!r} unknown; allowed: {', '.join(V2_DATATYPES)}")
        if any(d < -1 for d in t.shape):
            raise ConfigError(f"{where}.shape {list(t.shape)}: dimensions must be >= -1 (-1 = any size)")


def model_files(folder: str) -> dict[str, str]:
    """Every regular file under ``folder``: relative name (with ``/``) ->
    absolute path. Byte-code caches are not the model's files."""
    out = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for n in sorted(names):
            path = os.path.join(root, n)
            out[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.abspath(path)
    return out


def _in_folder(module: object, folder: str) -> bool:
    path = getattr(module, "__file__", None) or ""
    return bool(path) and os.path.abspath(path).startswith(folder + os.sep)


def import_object(target: str, folders: Sequence[str], *, field: str, expected: str) -> object:
    """The object ``module:Qual.Name``: its module from the first of
    ``folders`` that holds it (``top.py`` or a ``top/`` package folder for the
    module's first component), else from the installed packages. A module
    imported from a folder (and its siblings imported with it) is not left in
    ``sys.modules``, and the folder is not left on ``sys.path``. Raises
    ConfigError naming ``field`` and, for a missing attribute, ``expected``."""
    module_name, _, qual = target.partition(":")
    top = module_name.split(".")[0]
    local = next((d for d in folders if os.path.isfile(os.path.join(d, f"{top}.py"))
                  or os.path.isdir(os.path.join(d, top))), None)
    where = f"the model folder {local}" if local else "the installed packages"
    try:
        if local:
            module = _import_from(module_name, top, os.path.abspath(local))
        else:
            module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - user code: a SyntaxError or its own import error alike
        raise ConfigError(
            f"{field} {target!r}: cannot import module {module_name!r} from {where}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    obj: object = module
    for part in qual.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                f"{field} {target!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no {part!r}; "
                f"expected {expected}"
            ) from None
    return obj


def import_class(target: str, folder: str | None, *, field: str = "python.class", method: str = "predict") -> type:
    """The class ``module:Qual.Name`` (see :func:`import_object`), which
    must have a callable ``method``. Raises ConfigError naming ``field``."""
    obj = import_object(target, [folder] if folder is not None else [], field=field,
                        expected=f"a class with a {method}(self, inputs) method")
    if not isinstance(obj, type):
        raise ConfigError(f"{field} {target!r} is a {type(obj).__name__}, not a class")
    if not callable(getattr(obj, method, None)):
        raise ConfigError(f"{field} {target!r} has no {method}(self, inputs) method")
    return obj


def _import_from(module_name: str, top: str, folder: str):
    with _import_lock:
        # an installed (or another model's) module of the same name must not
        # answer for this folder's: set it aside while this one imports
        hidden = {k: sys.modules.pop(k) for k in list(sys.modules) if k == top or k.startswith(top + ".")}
        before = set(sys.modules)
        sys.path.insert(0, folder)
        importlib.invalidate_caches()
        try:
            return importlib.import_module(module_name)
        finally:
            sys.path.remove(folder)
            for k in set(sys.modules) - before:
                if _in_folder(sys.modules[k], folder):
                    del sys.modules[k]  # the class keeps its module's globals alive
            sys.modules.update(hidden)


def check_outputs(
    out: object,
    specs: Sequence[TensorSpec],
    rows: int | None,
    *,
    label: str,
    what: str,
    field: str,
    indexed: bool = True,
) -> dict[str, np.ndarray]:
    """``out`` (what user code returned) as ``specs`` promise, else
    FlywheelError saying what was expected and where that was declared.

    label: whose code (``model 'm'``); what: which call returned it
    (``predict``); field: where ``specs`` were declared, e.g.
    ``python.outputs`` (``indexed``: each tensor named as ``field[i]``) or
    ``the inputs of model 'm'`` (not indexed). ``rows``: the input rows,
    when the first dimension is the batch axis (each output must have as
    many); None otherwise. Returns the outputs by name, in ``specs`` order.
    """
    if not isinstance(out, Mapping):
        raise FlywheelError(
            f"{label}: {what} returned a {type(out).__name__}; expected a dict of output name -> "
            f"numpy array with the outputs {[s.name for s in specs]} ({field})"
        )
    if len(out) != len(specs) or any(s.name not in out for s in specs):
        want = [s.name for s in specs]
        missing = [n for n in want if n not in out]
        extra = sorted(str(n) for n in out if n not in want)
        raise FlywheelError(
            f"{label}: {what} returned the outputs {sorted(map(str, out))}; expected {want} ({field})"
            + (f"; missing {missing}" if missing else "") + (f"; not declared {extra}" if extra else "")
        )
    checked = {}
    for i, spec in enumerate(specs):
        arr = out[spec.name]
        where = f"{field}[{i}]" if indexed else field
        if not isinstance(arr, np.ndarray):
            raise FlywheelError(
                f"{label}: output {spec.name!r} is a {type(arr).__name__}; expected a numpy array "
                f"of {spec.datatype} with shape {list(spec.shape)} ({where})"
            )
        if arr.dtype != numpy_dtype(spec.datatype):
            try:
                got = v2_datatype(arr.dtype)
            except FlywheelError:  # complex, datetime...: no V2 name
                got = "no V2 datatype"
            raise FlywheelError(
                f"{label}: output {spec.name!r} has datatype {got} (numpy {arr.dtype}); expected "
                f"{spec.datatype} ({where}.datatype)"
                + (": an object array of bytes" if spec.datatype == "BYTES" else "")
            )
        if arr.ndim != len(spec.shape) or any(w != -1 and w != g for w, g in zip(spec.shape, arr.shape)):
            raise FlywheelError(
                f"{label}: output {spec.name!r} has shape {list(arr.shape)}; expected "
                f"{list(spec.shape)} (-1 = any size) ({where}.shape)"
            )
        if rows is not None and arr.shape[0] != rows:
            raise FlywheelError(
                f"{label}: output {spec.name!r} has {arr.shape[0]} rows for {rows} input rows; "
                f"expected one output row per input row ({where}.shape: the first dimension is the batch axis)"
            )
        checked[spec.name] = arr
    return checked


def warm_up_or_refuse(backend: Backend, batch_sizes: tuple[int, ...]) -> None:
    """Run ``backend`` once per batch size on zero-filled inputs; a
    FlywheelError (user code failing, or answering off what the next stage
    expects) closes it and becomes a ConfigError: the load fails, before any
    traffic."""
    for n in batch_sizes:
        try:
            backend.infer(backend.example_inputs(n))
        except FlywheelError as exc:
            backend.close()
            raise ConfigError(
                f"{exc.message} (at warm-up, on zero-filled inputs of {n} row(s); set warmup_batch_sizes: [] "
                "and batching.inline: false to skip running the model before traffic)"
            ) from exc.__cause__
