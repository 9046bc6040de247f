"""Python backend (``backend: python``): a user's own class serves the model.

The model config names the class and, usually, its signature::

    - name: scaled
      path: models/scaled            # a folder: the class's files and data
      backend: python
      python:
        class: "scaled_model:ScaledLinear"   # module:Class
        inputs:  [{name: x, datatype: FP32, shape: [-1, 4]}]
        outputs: [{name: y, datatype: FP32, shape: [-1, 2]}]
        batched: true                # predict gets the batcher's merged batch
        kwargs: {scale: 2.0}         # handed to load() as config["kwargs"]

The class contract (the same as Triton's Python backend and MLServer's custom
runtimes, less their boilerplate)::

    class ScaledLinear:
        signature = {...}                      # optional, see below
        def load(self, artifacts, config): ... # optional
        def predict(self, inputs): ...         # or ``async def predict``
        def close(self): ...                   # optional

- ``cls()`` takes no arguments; ``load(artifacts, config)`` then gets
  ``artifacts``, a dict of every file of the model (its name relative to the
  folder -> an absolute path; for a registry ``ref``, each artifact of the
  version by its name), and ``config``, a dict with ``name``, ``version``,
  ``kwargs`` (``python.kwargs``) and ``batched``. ``load`` may be a
  coroutine function.
- ``predict(inputs)`` gets a dict of input name -> NumPy array (validated
  against the signature, read-only: copy before changing one) and returns a
  dict with exactly the declared outputs, each a NumPy array of the declared
  datatype and shape (BYTES: an object array of ``bytes``); with a batch
  axis, one row per input row. Anything else fails the batch with a message
  naming the model, the output and what was expected; at warm-up, it fails
  the load instead. An exception fails only its batch (HTTP 500 carrying
  its message); raise ``flywheel.protocol.errors.InvalidInputError`` for a
  400.
- Sync ``predict`` runs on the replica's batch worker thread (or inline when
  warm-up timing says it is fast enough, as for any model); with
  ``batching.max_concurrent_batches`` > 1 it must be thread-safe. An
  ``async def predict`` is awaited on an event loop of the model's own (one
  thread per model), so that it neither blocks the request loop nor sees
  it; concurrent batches then overlap there.
- ``batched: false`` (the default, as in Triton and MLServer): each request
  reaches ``predict`` alone, rows as sent. ``batched: true``: requests are
  merged along the first axis by the batcher first, which needs every tensor
  to have a variable first dimension (``-1``).
- The signature is ``python.inputs`` / ``python.outputs`` when given (as in
  Triton's ``config.pbtxt``); else the class's (or, after ``load``, the
  instance's) ``signature`` attribute: ``{"inputs": [...], "outputs":
  [...]}`` of ``{name, datatype, shape}``. It is what V2 metadata shows and
  what requests are validated against.

Where the code comes from, and what is trusted: only the class named by
``python.class`` in the deploy config is imported, from the module of that
name in the model's folder when there is one, else from the installed
packages. The folder is on ``sys.path`` only while that module imports, and
the modules imported from it are taken out of ``sys.modules`` again, so two
models (two versions of one) may each ship a ``model.py``. Nothing is ever
unpickled: artifacts reach the class as paths, and what it reads is its
own business (``np.load`` refuses pickles unless asked). Deploying a config
that names a class means running that code with the replica's rights:
review it as you would the deploy config itself.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping
from typing import Any

import msgspec
import numpy as np

from flywheel.protocol.datatypes import V2_DATATYPES, numpy_dtype, v2_datatype
from flywheel.protocol.errors import ConfigError, FlywheelError
from flywheel.runtime.backends.base import Backend
from flywheel.runtime.backends.registry import BackendSpec, ConfigField
from flywheel.runtime.signature import Signature, TensorSpec, signature_from_doc

log = logging.getLogger(__name__)

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_CLASS_PATH = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")

# sys.path and sys.modules belong to the whole process: one model's import
# from its folder at a time
_import_lock = threading.Lock()


class PythonTensor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One declared tensor: V2 ``{name, datatype, shape}`` (-1 = any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


class PythonModelConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The model config's ``python:`` block (backend python only).

    class: ``module:ClassName`` (``pkg.module:Outer.Inner`` works too), the
        module looked up first in the model's folder, then among the
        installed packages.
    inputs / outputs: the served signature (both or neither; neither = the
        class's ``signature`` attribute).
    batched: True = ``predict`` gets the batcher's merged batch (every tensor
        needs a variable first dimension); False = one request per call.
    kwargs: free-form settings handed to ``load`` as ``config["kwargs"]``.
    """

    class_: str = msgspec.field(default="", name="class")
    inputs: tuple[PythonTensor, ...] = ()
    outputs: tuple[PythonTensor, ...] = ()
    batched: bool = False
    kwargs: dict[str, Any] = {}

    def declared_signature(self) -> Signature | None:
        """The signature from ``inputs`` / ``outputs``; None when not given."""
        if not self.inputs:
            return None
        spec = lambda t: TensorSpec(t.name, t.datatype, tuple(t.shape))  # noqa: E731
        return Signature(tuple(spec(t) for t in self.inputs), tuple(spec(t) for t in self.outputs))


def check_tensors(field: str, tensors: tuple[PythonTensor, ...]) -> None:
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


def check_batched(signature: Signature, field: str) -> None:
    """``batched: true`` merges requests along the first axis: every tensor
    needs one, of variable size."""
    for kind, tensors in (("inputs", signature.inputs), ("outputs", signature.outputs)):
        for i, t in enumerate(tensors):
            if not t.shape or t.shape[0] != -1:
                raise ConfigError(
                    f"python.batched is true but {field}.{kind}[{i}] {t.name!r} has shape {list(t.shape)}; "
                    "a batched model needs -1 (the batch axis) as every tensor's first dimension, "
                    "or set python.batched: false"
                )


def _validate(model) -> None:
    cfg: PythonModelConfig = model.python
    if not cfg.class_:
        raise ConfigError("backend python needs python.class ('module:ClassName')")
    if not _CLASS_PATH.match(cfg.class_):
        raise ConfigError(f"python.class {cfg.class_!r} must be 'module:ClassName' (e.g. 'my_model:MyModel')")
    if bool(cfg.inputs) != bool(cfg.outputs):
        raise ConfigError(
            "python.inputs and python.outputs go together: give both, or neither (the class's `signature`)"
        )
    check_tensors("python.inputs", cfg.inputs)
    check_tensors("python.outputs", cfg.outputs)
    declared = cfg.declared_signature()
    if declared is not None and cfg.batched:
        check_batched(declared, "python")


def _files(folder: str) -> dict[str, str]:
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


def import_class(target: str, folder: str | None) -> type:
    """The class ``module:Qual.Name``: its module from ``folder`` when the
    folder holds it (``top.py`` or ``top/__init__.py`` for the module's first
    component), else from the installed packages. A module imported from the
    folder (and its siblings imported with it) is not left in ``sys.modules``,
    and the folder is not left on ``sys.path``. Raises ConfigError naming
    ``python.class``."""
    module_name, _, qual = target.partition(":")
    top = module_name.split(".")[0]
    local = folder is not None and (
        os.path.isfile(os.path.join(folder, f"{top}.py")) or os.path.isfile(os.path.join(folder, top, "__init__.py"))
    )
    where = f"the model folder {folder}" if local else "the installed packages"
    try:
        if local:
            module = _import_from(module_name, top, os.path.abspath(folder))
        else:
            module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - user code: a SyntaxError or its own import error alike
        raise ConfigError(
            f"python.class {target!r}: cannot import module {module_name!r} from {where}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    obj: object = module
    for part in qual.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                f"python.class {target!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no {part!r}"
            ) from None
    if not isinstance(obj, type):
        raise ConfigError(f"python.class {target!r} is a {type(obj).__name__}, not a class")
    if not callable(getattr(obj, "predict", None)):
        raise ConfigError(f"python.class {target!r} has no predict(self, inputs) method")
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


class _OwnLoop:
    """An event loop on a daemon thread of its own, for a model's coroutines."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro) -> Any:
        """Run ``coro`` on the loop and wait for it (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


class PythonBackend(Backend):
    """A user class (``python.class``) loaded from the model's folder."""

    platform = "python"

    def __init__(self, folder: str, model) -> None:
        self._label = f"model {model.name!r}"
        if not os.path.isdir(folder):
            raise ConfigError(
                f"{self._label}: path {folder!r} must be a folder (backend python: the folder whose files "
                "are handed to load(), and where the class's module may live)"
            )
        self._folder = folder
        self._cfg: PythonModelConfig = model.python
        self._name, self._version = model.name, model.version
        self._model: Any = None
        self._loop: _OwnLoop | None = None
        self._async = False
        self._sig_field = "python.outputs"
        self._batchable = False

    # what the model server asks of a backend beyond infer()
    @property
    def merges_requests(self) -> bool:
        return self._cfg.batched

    @property
    def may_run_inline(self) -> bool:
        return not self._async

    def _fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self._label}: {message}")

    def load(self) -> None:
        target = self._cfg.class_
        try:
            cls = import_class(target, self._folder)
        except ConfigError as exc:
            raise self._fail(exc.message) from exc.__cause__
        self._async = inspect.iscoroutinefunction(cls.predict)
        load = getattr(cls, "load", None)
        if self._async or inspect.iscoroutinefunction(load):
            self._loop = _OwnLoop(f"flywheel-python-{self._name}")
        try:
            model = cls()
            if load is not None:
                config = {"name": self._name, "version": self._version, "kwargs": dict(self._cfg.kwargs),
                          "batched": self._cfg.batched}
                result = model.load(_files(self._folder), config)
                if inspect.isawaitable(result):
                    self._loop.run(result)
        except Exception as exc:  # noqa: BLE001 - user code: say whose, keep the cause
            self.close()
            raise self._fail(f"python.class {target!r}: load() raised {type(exc).__name__}: {exc}") from exc
        self._model = model
        try:
            self._signature = self._find_signature(model)
        except ConfigError:
            self.close()
            raise
        self._batchable = self._signature.batchable

    def _find_signature(self, model: Any) -> Signature:
        declared = self._cfg.declared_signature()
        if declared is not None:
            return declared
        self._sig_field = f"the `signature` of {self._cfg.class_}"
        doc = getattr(model, "signature", None)
        if doc is None:
            raise self._fail(
                f"python.class {self._cfg.class_!r} declares no signature: give python.inputs and python.outputs, "
                "or a `signature = {'inputs': [...], 'outputs': [...]}` attribute on the class"
            )
        try:
            sig = doc if isinstance(doc, Signature) else signature_from_doc(doc)
            check_tensors("inputs", tuple(PythonTensor(t.name, t.datatype, t.shape) for t in sig.inputs))
            check_tensors("outputs", tuple(PythonTensor(t.name, t.datatype, t.shape) for t in sig.outputs))
            if not sig.inputs or not sig.outputs:
                raise ConfigError("needs at least one input and one output")
            if self._cfg.batched:
                check_batched(sig, "signature")
        except FlywheelError as exc:
            raise self._fail(f"{self._sig_field}: {exc.message}") from None
        return sig

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            if self._async:
                out = self._loop.run(self._model.predict(inputs))
            else:
                out = self._model.predict(inputs)
        except FlywheelError:
            raise  # the class's own choice of error (InvalidInputError: a 400)
        except Exception as exc:  # noqa: BLE001 - fails this batch only
            log.warning("%s: predict raised", self._label, exc_info=True)
            raise FlywheelError(f"{self._label}: predict raised {type(exc).__name__}: {exc}") from exc
        rows = None
        if self._batchable:
            first = next(iter(inputs.values()), None)
            rows = int(first.shape[0]) if first is not None and first.ndim else None
        return self._check_outputs(out, rows)

    def _check_outputs(self, out: object, rows: int | None) -> dict[str, np.ndarray]:
        """``out`` as the signature promises (else FlywheelError saying what
        was expected, and where that was declared)."""
        specs = self._signature.outputs
        field = self._sig_field
        if not isinstance(out, Mapping):
            raise FlywheelError(
                f"{self._label}: predict returned a {type(out).__name__}; expected a dict of output name -> "
                f"numpy array with the outputs {[s.name for s in specs]} ({field})"
            )
        if len(out) != len(specs) or any(s.name not in out for s in specs):
            want = [s.name for s in specs]
            missing = [n for n in want if n not in out]
            extra = sorted(str(n) for n in out if n not in want)
            raise FlywheelError(
                f"{self._label}: predict returned the outputs {sorted(map(str, out))}; expected {want} ({field})"
                + (f"; missing {missing}" if missing else "") + (f"; not declared {extra}" if extra else "")
            )
        checked = {}
        for i, spec in enumerate(specs):
            arr = out[spec.name]
            where = f"{field}[{i}]" if field == "python.outputs" else field
            if not isinstance(arr, np.ndarray):
                raise FlywheelError(
                    f"{self._label}: output {spec.name!r} is a {type(arr).__name__}; expected a numpy array "
                    f"of {spec.datatype} with shape {list(spec.shape)} ({where})"
                )
            if arr.dtype != numpy_dtype(spec.datatype):
                try:
                    got = v2_datatype(arr.dtype)
                except FlywheelError:  # complex, datetime...: no V2 name
                    got = "no V2 datatype"
                raise FlywheelError(
                    f"{self._label}: output {spec.name!r} has datatype {got} (numpy {arr.dtype}); expected "
                    f"{spec.datatype} ({where}.datatype)"
                    + (": an object array of bytes" if spec.datatype == "BYTES" else "")
                )
            if arr.ndim != len(spec.shape) or any(w != -1 and w != g for w, g in zip(spec.shape, arr.shape)):
                raise FlywheelError(
                    f"{self._label}: output {spec.name!r} has shape {list(arr.shape)}; expected "
                    f"{list(spec.shape)} (-1 = any size) ({where}.shape)"
                )
            if rows is not None and arr.shape[0] != rows:
                raise FlywheelError(
                    f"{self._label}: output {spec.name!r} has {arr.shape[0]} rows for {rows} input rows; "
                    f"expected one output row per input row ({where}.shape: the first dimension is the batch axis)"
                )
            checked[spec.name] = arr
        return checked

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """As Backend's, but a predict that fails or answers out of its
        signature on the warm-up inputs fails the load (ConfigError)."""
        for n in batch_sizes:
            try:
                self.infer(self.example_inputs(n))
            except FlywheelError as exc:
                self.close()
                raise ConfigError(
                    f"{exc.message} (at warm-up, on zero-filled inputs of {n} row(s); set warmup_batch_sizes: [] "
                    "and batching.inline: false to skip running the model before traffic)"
                ) from exc.__cause__

    def close(self) -> None:
        """Call the class's ``close()`` if it has one; stop the model's loop."""
        model, self._model = self._model, None
        try:
            done = getattr(model, "close", None) if model is not None else None
            if done is not None:
                result = done()
                if inspect.isawaitable(result) and self._loop is not None:
                    self._loop.run(result)
        except Exception:  # noqa: BLE001 - closing must not fail the caller's shutdown
            log.warning("%s: close() raised", self._label, exc_info=True)
        finally:
            if self._loop is not None:
                self._loop.close()
                self._loop = None


def _create(path: str, model) -> PythonBackend:
    return PythonBackend(path, model)


SPEC = BackendSpec(
    name="python",
    create=_create,
    summary="a user Python class (python.class) loaded from the model's folder or an installed package",
    fields=(ConfigField("python", PythonModelConfig, PythonModelConfig()),),
    validate=_validate,
    folder=True,
)
