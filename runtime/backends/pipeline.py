"""A pipeline: several models chained in one served model, inside the replica.

A model config's ``pipeline:`` lists stages (serving/config.py,
``PipelineStage``), each a model with its own backend::

    - name: scorer
      pipeline:
        - {name: embed, path: models/embed.onnx}                 # onnxruntime
        - {name: head, path: models/head, backend: python,
           python: {class: "head:Head", batched: true, inputs: [...], outputs: [...]}}

Stage k+1 is called with the outputs of stage k that it takes as inputs, by
name (outputs it does not take are dropped); the served signature is the
first stage's inputs and the last stage's outputs, so callers see one model.
At load, every input of stage k+1 must be an output of stage k with the same
datatype and rank and no conflicting fixed dimension; on every batch the
arrays handed on are checked again (names, datatypes, shapes, rows), so a
stage that answers off its signature fails its batch with a message naming
the pipeline, the stage and the tensor. Nothing leaves the process: stages
run one after the other on the batch's thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from flywheel.protocol.errors import ConfigError, FlywheelError
from flywheel.runtime.backends.base import Backend
from flywheel.runtime.backends.user_code import check_outputs, warm_up_or_refuse
from flywheel.runtime.signature import Signature, TensorSpec

__all__ = ["PipelineBackend"]

log = logging.getLogger(__name__)


def _mismatch(given: TensorSpec, wanted: TensorSpec) -> str | None:
    """Why ``given`` (an output) cannot feed ``wanted`` (an input); None if it can."""
    if given.datatype != wanted.datatype:
        return f"datatype {given.datatype}, expected {wanted.datatype}"
    if len(given.shape) != len(wanted.shape) or any(
        g != -1 and w != -1 and g != w for g, w in zip(given.shape, wanted.shape)
    ):
        return f"shape {list(given.shape)}, expected {list(wanted.shape)} (-1 = any size)"
    return None


class PipelineBackend(Backend):
    """Stages ``(name, backend)`` run in order on one batch. Thread-safety:
    that of its stages."""

    platform = "pipeline"

    def __init__(self, name: str, stages: Sequence[tuple[str, Backend]]) -> None:
        if not stages:
            raise ConfigError(f"model {name!r}: a pipeline needs at least one stage")
        self._label = f"model {name!r}"
        self._stages = list(stages)
        self._loaded: list[Backend] = []
        self._batchable = False
        # per stage after the first: (its label, its input specs, rows checked?)
        self._links: list[tuple[str, tuple[TensorSpec, ...], bool]] = []

    @property
    def merges_requests(self) -> bool:  # type: ignore[override]
        return all(b.merges_requests for _, b in self._stages)

    @property
    def may_run_inline(self) -> bool:  # type: ignore[override]
        return all(b.may_run_inline for _, b in self._stages)

    def _where(self, i: int) -> str:
        return f"{self._label}: pipeline[{i}] ({self._stages[i][0]!r})"

    def load(self) -> None:
        try:
            for i, (_, backend) in enumerate(self._stages):
                try:
                    backend.load()
                except FlywheelError as exc:
                    raise ConfigError(f"{self._where(i)}: {exc.message}") from exc.__cause__
                self._loaded.append(backend)
            self._link()
        except BaseException:
            self.close()
            raise
        first, last = self._stages[0][1].signature, self._stages[-1][1].signature
        self._signature = Signature(first.inputs, last.outputs)
        self._batchable = self._signature.batchable

    def _link(self) -> None:
        """Check, stage by stage, that each input of the next stage is an
        output of this one that fits; ConfigError naming both otherwise."""
        self._links = []
        for i in range(1, len(self._stages)):
            prev_name, prev = self._stages[i - 1][0], self._stages[i - 1][1].signature
            wanted = self._stages[i][1].signature
            given = {t.name: t for t in prev.outputs}
            for j, spec in enumerate(wanted.inputs):
                out = given.get(spec.name)
                if out is None:
                    raise ConfigError(
                        f"{self._where(i)}: input {spec.name!r} (inputs[{j}]) is no output of the stage before "
                        f"({prev_name!r}), whose outputs are {sorted(given)}; stages are linked by tensor name"
                    )
                why = _mismatch(out, spec)
                if why is not None:
                    raise ConfigError(
                        f"{self._where(i)}: input {spec.name!r} is fed by output {spec.name!r} of {prev_name!r} "
                        f"with {why}"
                    )
            self._links.append((f"{self._where(i - 1)} into pipeline[{i}] ({self._stages[i][0]!r})",
                                wanted.inputs, wanted.batchable))

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = None
        if self._batchable:
            first = next(iter(inputs.values()), None)
            rows = int(first.shape[0]) if first is not None and first.ndim else None
        x = inputs
        for i, (_, backend) in enumerate(self._stages):
            if i:
                label, specs, batched = self._links[i - 1]
                handed = {s.name: x.get(s.name) for s in specs}
                x = check_outputs(handed, specs, rows if batched else None, label=label, what="the stage",
                                  field=f"the inputs of pipeline[{i}]")
            try:
                x = backend.infer(x)
            except FlywheelError as exc:
                named = FlywheelError(f"{self._where(i)}: {exc.message}")
                named.code = exc.code  # a stage's 400 stays a 400
                raise named from exc
            except Exception as exc:  # noqa: BLE001 - a stage's runtime error fails this batch only
                log.warning("%s failed", self._where(i), exc_info=True)
                raise FlywheelError(f"{self._where(i)}: {type(exc).__name__}: {exc}") from exc
        return x

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run the whole pipeline on zero-filled inputs; a stage that fails
        or answers off what the next expects fails the load (ConfigError)."""
        warm_up_or_refuse(self, batch_sizes)

    def close(self) -> None:
        """Close the loaded stages, last first. Safe twice."""
        loaded, self._loaded = self._loaded, []
        for backend in reversed(loaded):
            try:
                backend.close()
            except Exception:  # noqa: BLE001 - one stage's close must not keep the others open
                log.warning("%s: a stage's close() raised", self._label, exc_info=True)
