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
import inspect
import logging
import os
import threading
from typing import Any

import msgspec
import numpy as np

from flywheel.protocol.errors import ConfigError, FlywheelError
from flywheel.runtime.backends.base import Backend
from flywheel.runtime.backends.registry import BackendSpec, ConfigField
from flywheel.runtime.backends.user_code import (
    CLASS_PATH,
    UserTensor,
    check_outputs,
    check_tensors,
    import_class,
    model_files,
    warm_up_or_refuse,
)
from flywheel.runtime.signature import Signature, TensorSpec, signature_from_doc

log = logging.getLogger(__name__)

# the tensor type of python.inputs / python.outputs (shared with the steps)
PythonTensor = UserTensor
__all__ = ["PythonBackend", "PythonModelConfig", "PythonTensor", "SPEC", "check_batched", "check_tensors",
           "import_class"]


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
    if not CLASS_PATH.match(cfg.class_):
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
                result = model.load(model_files(self._folder), config)
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
        field = self._sig_field
        return check_outputs(out, self._signature.outputs, rows, label=self._label, what="predict", field=field,
                             indexed=field == "python.outputs")

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """As Backend's, but a predict that fails or answers out of its
        signature on the warm-up inputs fails the load (ConfigError)."""
        warm_up_or_refuse(self, batch_sizes)

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
