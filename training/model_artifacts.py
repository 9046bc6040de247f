"""What a trained user model (``model.factory``) is registered with, so that
it can be served without ONNX.

A factory model may use what ONNX cannot express; its version then still
serves through ``backend: torch`` with ``torch.factory`` naming the factory
(runtime/backends/torch_backend.py), which needs, beside the weights, the
code that defines the factory and the signature to serve. This module puts
them together; training/runner.py registers what it returns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from flywheel.protocol.errors import ConfigError
from flywheel.runtime.backends.torch_backend import CODE_ARTIFACT, MANIFEST, WEIGHTS, FactoryManifest
from flywheel.runtime.signature import Signature

__all__ = ["FactoryModelArtifacts", "factory_model_artifacts"]


@dataclass(frozen=True)
class FactoryModelArtifacts:
    """``artifacts``: artifact name -> file path (or bytes) for
    ``Registry.register_version``; ``params``: the version's params."""

    artifacts: dict[str, str | bytes] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


def factory_model_artifacts(
    model_spec,
    signature: Signature,
    weights: str,
    *,
    code: str = "",
    pack_dir: str = "",
    onnx: str = "",
    task: str = "",
) -> FactoryModelArtifacts:
    """The artifacts and params of a trained factory model's version.

    model_spec: the job's ModelSpec (``factory``, ``kwargs``).
    signature: what the model serves (its inputs, in forward's order).
    weights: the trained ``model.safetensors``.
    code: the job's ``code`` folder ("" when the factory is installed);
        packed into ``pack_dir`` as training/code_package.py packs it for the
        workers (an identical pack already there is reused) and registered
        as ``code.zip``.
    onnx: the exported ``model.onnx``, "" when export failed or was off.
    task: the job's task, kept in params as before.

    Artifacts: ``model.safetensors``, ``torch_model.json``
    (FactoryManifest), ``code.zip`` with code, ``model.onnx`` when given.
    Params: ``factory``, ``kwargs``, ``input_shape`` and ``task``.
    ConfigError when the spec names no factory or ``code`` is not a folder.
    """
    if not getattr(model_spec, "factory", ""):
        raise ConfigError("model.factory: not a factory model (a built-in architecture registers its hparams)")
    if not signature.inputs:
        raise ConfigError("signature: a factory model needs at least one input")
    input_shape = [int(d) for d in signature.inputs[0].shape[1:]]
    tensor = lambda t: {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}  # noqa: E731
    artifacts: dict[str, str | bytes] = {WEIGHTS: weights}
    if code:
        from flywheel.training.code_package import pack_code

        uri = pack_code(code, pack_dir or os.path.join(os.path.dirname(os.path.abspath(weights)), "code"))
        artifacts[CODE_ARTIFACT] = uri.removeprefix("file://")
    manifest = FactoryManifest(
        factory=model_spec.factory,
        kwargs=dict(model_spec.kwargs),
        input_shape=input_shape,
        signature={"inputs": [tensor(t) for t in signature.inputs],
                   "outputs": [tensor(t) for t in signature.outputs]},
        code=CODE_ARTIFACT if code else "",
    )
    artifacts[MANIFEST] = manifest.encode()
    if onnx:
        artifacts["model.onnx"] = onnx
    params = {"factory": model_spec.factory, "kwargs": dict(model_spec.kwargs), "input_shape": input_shape}
    if task:
        params["task"] = task
    return FactoryModelArtifacts(artifacts=artifacts, params=params)
