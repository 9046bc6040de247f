"""A test-only Flywheel backend plug-in: ``backend: poison`` answers ``2 * x``,
except that an input holding POISON kills its whole process at once (as a
segfault in a native runtime would), after appending its pid to
``settings.crash_log``. Registered through the ``flywheel.backends`` entry
point of the dist-info folder beside it; nothing is installed, the folder is
put on the replicas' PYTHONPATH by the test's runtime_env."""

from __future__ import annotations

import os

import msgspec
import numpy as np

from flywheel.runtime.backends import Backend, BackendSpec
from flywheel.runtime.signature import Signature, TensorSpec

POISON = 666.0
WIDTH = 4


class PoisonSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """crash_log: a file each dying process appends its pid to."""

    crash_log: str


class Poisonable(Backend):
    platform = "toy_poison"

    def __init__(self, settings: PoisonSettings) -> None:
        self._crash_log = settings.crash_log
        self._signature: Signature | None = None

    def load(self) -> None:
        self._signature = Signature(
            inputs=(TensorSpec("x", "FP32", (-1, WIDTH)),),
            outputs=(TensorSpec("y", "FP32", (-1, WIDTH)),),
        )

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        if (x == POISON).any():
            with open(self._crash_log, "a") as f:
                f.write(f"{os.getpid()}\n")
            os._exit(1)
        return {"y": x * np.float32(2)}


def _create(path: str, model) -> Poisonable:
    return Poisonable(SPEC.parse_settings(model.settings))


SPEC = BackendSpec(
    name="poison",
    create=_create,
    summary="any file; answers its input doubled, dies on 666 (a test plug-in)",
    settings=PoisonSettings,
)
