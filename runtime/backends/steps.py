"""Pre- and post-processing steps: user classes run around a model, in the
replica, on the same batch.

A model config may name a ``preprocess`` step, a ``postprocess`` step or
both::

    - name: sentiment
      path: models/sentiment/model.onnx   # any backend
      preprocess:
        class: "steps:Tokenize"           # module:Class, as python.class
        kwargs: {vocab: vocab.txt}
        inputs: [{name: text, datatype: BYTES, shape: [-1]}]       # what callers send
      postprocess:
        class: "steps:Labels"
        outputs: [{name: label, datatype: BYTES, shape: [-1]}]     # what callers get

The served model is then one model with the *outer* signature: the
preprocess step's ``inputs`` (else the model's inputs) and the postprocess
step's ``outputs`` (else the model's outputs). V2 metadata, request
validation, the batcher, drift sampling, capture and metrics all see that
signature; tritonclient sees one model.

The step contract (the python backend's, with ``process`` for ``predict``)::

    class Tokenize:
        def load(self, artifacts, config): ...   # optional
        def process(self, inputs): ...           # dict name -> array, to the same
        def close(self): ...                     # optional

- The class comes from the model's folder (the folder of ``path``, or
  ``path`` itself when it is a folder; for a registry ``ref``, a folder
  holding every artifact of the version), else from the installed
  packages, exactly as ``python.class`` does (runtime/backends/user_code.py).
- ``load(artifacts, config)``: ``artifacts`` maps each file of that folder
  to its path; ``config`` holds ``name``, ``version``, ``kwargs`` and
  ``step`` (``"preprocess"`` or ``"postprocess"``).
- ``process(inputs)`` gets the whole merged batch (read-only arrays) and
  returns a dict. A preprocess step must return exactly the model's inputs,
  a postprocess step exactly its declared ``outputs``, each of the expected
  datatype and shape, and one row per input row when the signature has a
  batch axis. Anything else fails the batch with a message naming the
  model, the step and the tensor; at warm-up (on zero-filled inputs, empty
  strings for BYTES) it fails the load instead.
- An exception fails only its batch (HTTP 500 / gRPC INTERNAL carrying the
  message); raise ``flywheel.protocol.errors.InvalidInputError`` for a 400 /
  INVALID_ARGUMENT. ``process`` must be a plain function: it runs on the
  batch's thread (a worker thread, or the request loop when warm-up timing
  says the whole chain is fast enough), and must be thread-safe with
  ``batching.max_concurrent_batches`` > 1.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import msgspec
import numpy as np

from flywheel.protocol.errors import ConfigError, FlywheelError
from flywheel.runtime.backends.base import Backend
from flywheel.runtime.backends.user_code import (
    UserTensor,
    check_class_path,
    check_outputs,
    check_tensors,
    import_class,
    model_files,
    warm_up_or_refuse,
)
from flywheel.runtime.signature import Signature, TensorSpec

__all__ = ["StepConfig", "StepsBackend", "check_steps"]

log = logging.getLogger(__name__)

PRE, POST = "preprocess", "postprocess"


class StepConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A model's ``preprocess:`` or ``postprocess:`` block.

    class: ``module:ClassName`` of the step (from the model's folder, else
        the installed packages).
    kwargs: free-form settings handed to ``load`` as ``config["kwargs"]``.
    inputs: preprocess only, required: what callers send (the outer inputs).
        The step's outputs are the model's inputs.
    outputs: postprocess only, required: what callers get (the outer
        outputs). The step's inputs are the model's outputs.
    """

    class_: str = msgspec.field(default="", name="class")
    kwargs: dict[str, Any] = {}
    inputs: tuple[UserTensor, ...] = ()
    outputs: tuple[UserTensor, ...] = ()


def check_steps(pre: StepConfig | None, post: StepConfig | None) -> None:
    """The config checks of a model's steps; ConfigError naming the field."""
    for kind, step, declared, implied in ((PRE, pre, "inputs", "outputs"), (POST, post, "outputs", "inputs")):
        if step is None:
            continue
        check_class_path(f"{kind}.class", step.class_)
        if not getattr(step, declared):
            raise ConfigError(
                f"{kind}.{declared} is required: the {declared} callers see "
                f"(a list of {{name, datatype, shape}})"
            )
        if getattr(step, implied):
            raise ConfigError(
                f"{kind}.{implied} must not be given: a {kind} step's {implied} are the model's "
                f"{'inputs' if kind == PRE else 'outputs'}"
            )
        check_tensors(f"{kind}.{declared}", getattr(step, declared))


class _Step:
    """One loaded step: the user object and what its output must be."""

    def __init__(self, kind: str, cfg: StepConfig, obj: Any, label: str) -> None:
        self.kind, self.cfg, self.obj = kind, cfg, obj
        self.label = f"{label}: {kind} step {cfg.class_!r}"

    def run(self, inputs: dict[str, np.ndarray], specs: tuple[TensorSpec, ...], rows: int | None,
            field: str) -> dict[str, np.ndarray]:
        try:
            out = self.obj.process(inputs)
        except FlywheelError:
            raise  # the step's own choice of error (InvalidInputError: a 400)
        except Exception as exc:  # noqa: BLE001 - fails this batch only
            log.warning("%s: process raised", self.label, exc_info=True)
            raise FlywheelError(f"{self.label}: process raised {type(exc).__name__}: {exc}") from exc
        return check_outputs(out, specs, rows, label=self.label, what="process", field=field)

    def close(self) -> None:
        done = getattr(self.obj, "close", None)
        if done is None:
            return
        try:
            done()
        except Exception:  # noqa: BLE001 - closing must not fail the caller's shutdown
            log.warning("%s: close() raised", self.label, exc_info=True)


class StepsBackend(Backend):
    """A model's backend with its pre/post steps around it: one Backend whose
    signature is the outer one. Thread-safety: that of the inner backend and
    the steps (see the module docstring)."""

    def __init__(self, inner: Backend, *, name: str, version: str, folder: str | None,
                 preprocess: StepConfig | None, postprocess: StepConfig | None) -> None:
        """``folder``: where the steps' modules and files are (None: the
        installed packages only, and no artifacts)."""
        self._inner = inner
        self._name, self._version = name, version
        self._label = f"model {name!r}"
        self._folder = folder
        self._cfgs = {PRE: preprocess, POST: postprocess}
        self._pre: _Step | None = None
        self._post: _Step | None = None
        self._rows_pre = False  # check rows between the preprocess step and the model
        self._batchable = False

    @property
    def platform(self) -> str:  # type: ignore[override] - what callers see is the model's
        return self._inner.platform

    @property
    def merges_requests(self) -> bool:  # type: ignore[override]
        return self._inner.merges_requests

    @property
    def may_run_inline(self) -> bool:  # type: ignore[override]
        return self._inner.may_run_inline

    def load(self) -> None:
        self._inner.load()
        try:
            self._pre = self._load_step(PRE)
            self._post = self._load_step(POST)
        except BaseException:
            self.close()
            raise
        inner = self._inner.signature
        inputs = tuple(t.spec() for t in self._pre.cfg.inputs) if self._pre else inner.inputs
        outputs = tuple(t.spec() for t in self._post.cfg.outputs) if self._post else inner.outputs
        self._signature = Signature(inputs, outputs)
        self._batchable = self._signature.batchable
        self._rows_pre = self._batchable and inner.batchable

    def _load_step(self, kind: str) -> _Step | None:
        cfg = self._cfgs[kind]
        if cfg is None:
            return None
        try:
            cls = import_class(cfg.class_, self._folder, field=f"{kind}.class", method="process")
        except ConfigError as exc:
            raise ConfigError(f"{self._label}: {exc.message}") from exc.__cause__
        if inspect.iscoroutinefunction(cls.process) or inspect.iscoroutinefunction(getattr(cls, "load", None)):
            raise ConfigError(
                f"{self._label}: {kind}.class {cfg.class_!r}: process and load must be plain functions "
                "(a step runs on its batch's thread, not on an event loop)"
            )
        try:
            obj = cls()
            load = getattr(obj, "load", None)
            if load is not None:
                files = model_files(self._folder) if self._folder else {}
                load(files, {"name": self._name, "version": self._version, "kwargs": dict(cfg.kwargs),
                             "step": kind})
        except Exception as exc:  # noqa: BLE001 - user code: say whose, keep the cause
            raise ConfigError(
                f"{self._label}: {kind}.class {cfg.class_!r}: load() raised {type(exc).__name__}: {exc}"
            ) from exc
        return _Step(kind, cfg, obj, self._label)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = None
        if self._batchable:
            first = next(iter(inputs.values()), None)
            rows = int(first.shape[0]) if first is not None and first.ndim else None
        x = inputs
        if self._pre is not None:
            x = self._pre.run(x, self._inner.signature.inputs, rows if self._rows_pre else None,
                              "the model's inputs")
        y = self._inner.infer(x)
        if self._post is not None:
            y = self._post.run(y, self._signature.outputs, rows, f"{POST}.outputs")
        return y

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run the whole chain on zero-filled outer inputs (BYTES: empty
        strings); a step that fails or answers off what the next stage
        expects fails the load (ConfigError) naming the step and tensor."""
        warm_up_or_refuse(self, batch_sizes)

    def close(self) -> None:
        """Close the steps (their ``close()``), then the model. Safe twice."""
        for attr in ("_post", "_pre"):
            step = getattr(self, attr)
            setattr(self, attr, None)
            if step is not None:
                step.close()
        self._inner.close()
