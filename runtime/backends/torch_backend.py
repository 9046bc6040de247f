"""PyTorch backend (``backend: torch``): a registered architecture plus
safely loaded weights. The model config gives ``architecture`` (a name from
runtime/architectures.py, required) and ``hparams``; the file is .safetensors
weights. torch is imported by ``load()`` only."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from flywheel.runtime.architectures import build
from flywheel.runtime.backends.base import Backend, refuse_pickle
from flywheel.runtime.backends.registry import BackendSpec, ConfigField
from flywheel.protocol.errors import ConfigError, IntegrityError
from flywheel.runtime.extras import require_extra
from flywheel.runtime.signature import Signature


def load_state_dict(path: str) -> dict:
    """Weights from a safetensors file; pickles (torch.save) are refused."""
    refuse_pickle(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except SafetensorError as exc:
        raise IntegrityError(f"{path} is not a safetensors file: {exc}") from None


class TorchBackend(Backend):
    """A torch module rebuilt from (architecture, hyper-parameters, weights)."""

    platform = "pytorch_safetensors"

    def __init__(
        self, weights: str, architecture: str, hparams: Mapping[str, Any] | None = None
    ) -> None:
        if not os.path.isfile(weights):
            raise ConfigError(f"weights file {weights!r} does not exist")
        self._weights = weights
        self._arch = architecture
        self._hparams = dict(hparams or {})
        self._module = None
        self._signature: Signature | None = None

    def load(self) -> None:
        require_extra("train", ("torch",), "backend 'torch'")
        import torch

        module, self._signature = build(self._arch, self._hparams)
        module.load_state_dict(load_state_dict(self._weights))
        module.eval()
        self._module = module
        self._torch = torch

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        args = [torch.from_numpy(np.ascontiguousarray(inputs[s.name])) for s in self._signature.inputs]
        with torch.inference_mode():
            out = self._module(*args)
        if not isinstance(out, (tuple, list)):
            out = (out,)
        return {s.name: t.numpy() for s, t in zip(self._signature.outputs, out)}


def _create(path: str, model) -> TorchBackend:
    return TorchBackend(path, model.architecture, model.hparams)


def _validate(model) -> None:
    if not model.architecture:
        raise ConfigError("backend torch needs 'architecture'")


SPEC = BackendSpec(
    name="torch",
    create=_create,
    summary="safetensors weights of a registered architecture, run by PyTorch",
    # not exclusive: other backends ignore them, as they always did
    fields=(
        ConfigField("architecture", str, "", exclusive=False),
        ConfigField("hparams", dict[str, Any], {}, exclusive=False),
    ),
    validate=_validate,
)
