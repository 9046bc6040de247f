"""A test-only Flywheel backend plug-in: ``backend: doubler`` answers ``2 * x``.

It is registered the way a third-party package registers one: an entry point
in the ``flywheel.backends`` group (see the dist-info folder beside this
file), found by importlib.metadata once this folder is on sys.path. Nothing
is installed. Its settings come as the model's ``settings:`` mapping.
"""

from __future__ import annotations

import os

import msgspec
import numpy as np

from flywheel.protocol.errors import ConfigError
from flywheel.runtime.backends import Backend, BackendSpec
from flywheel.runtime.signature import Signature, TensorSpec


class DoublerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """width: features per row of input ``x`` and output ``y``."""

    width: int = 4

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ConfigError(f"settings.width {self.width} must be >= 1")


class Doubler(Backend):
    """Output ``y`` is input ``x`` times two (FP32, ``[-1, width]``)."""

    platform = "toy_doubler"

    def __init__(self, path: str, settings: DoublerSettings) -> None:
        if not os.path.isfile(path):
            raise ConfigError(f"model file {path!r} does not exist")
        self._width = settings.width
        self._signature: Signature | None = None

    def load(self) -> None:
        self._signature = Signature(
            inputs=(TensorSpec("x", "FP32", (-1, self._width)),),
            outputs=(TensorSpec("y", "FP32", (-1, self._width)),),
        )

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"] * np.float32(2)}


def _create(path: str, model) -> Doubler:
    return Doubler(path, SPEC.parse_settings(model.settings))


SPEC = BackendSpec(
    name="doubler",
    create=_create,
    summary="any file; answers its input doubled (a test plug-in)",
    settings=DoublerSettings,
)

# An entry point that holds no BackendSpec (registered as "not-a-spec").
NOT_A_SPEC = object()
