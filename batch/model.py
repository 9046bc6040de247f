"""The model a run scores with: resolved once by the driver, loaded once per
actor with the same runtime backends as serving, and checked against its
sha256 there, so that every actor on every node runs the same bytes."""

from __future__ import annotations

import os
import re

import msgspec

from flywheel.batch.job import PredictJob
from flywheel.protocol.errors import ConfigError, IntegrityError, InvalidInputError
from flywheel.runtime.backends import Backend, get_backend
from flywheel.runtime.backends.tensorrt_plan import file_sha256
from flywheel.runtime.signature import Signature

_DEFAULT_ARTIFACT = {"torch": "model.safetensors"}


class ModelSource(msgspec.Struct, frozen=True):
    """What every actor loads.

    label: what the output's ``model_version`` column says: the registry's
        ``name/version``, or the file's name.
    ref / registry / artifacts: a registry version (``name/version``) and
        where the registry is; empty for a file.
    path: a model file (file mode).
    """

    label: str
    artifact: str
    sha256: str
    backend: str
    signature: Signature
    ref: str = ""
    registry: str = ""
    artifacts: str = ""
    path: str = ""
    architecture: str = ""
    hparams: dict = {}
    settings: dict = {}


def looks_like_file(ref: str) -> bool:
    """A model reference that names a file rather than a registry version."""
    return os.path.isfile(ref) or ref.endswith((".onnx", ".safetensors"))


def resolve(job: PredictJob, registry_uri: str, artifacts_uri: str) -> ModelSource:
    """The model behind ``job.model``, its signature read without a GPU."""
    artifact = job.artifact or _DEFAULT_ARTIFACT.get(job.backend, "model.onnx")
    if looks_like_file(job.model):
        path = os.path.abspath(job.model)
        if not os.path.isfile(path):
            raise InvalidInputError(f"model: no such file {job.model!r}")
        if job.backend == "torch":
            raise ConfigError("model: backend torch needs a registry version (its architecture and hparams)")
        source = ModelSource(label=os.path.basename(path), artifact=os.path.basename(path), sha256=file_sha256(path),
                             backend=job.backend, signature=Signature((), ()), path=path, settings=job.settings)
        return msgspec.structs.replace(source, signature=_signature_of(source))
    from flywheel.registry import Registry

    reg = Registry.open(registry_uri, artifacts_uri)
    try:
        mv = reg.resolve(job.model)
        if artifact not in mv.artifacts:
            raise InvalidInputError(f"model {mv.ref}: no artifact {artifact!r}; it has {sorted(mv.artifacts)}")
        params = dict(mv.params)
        architecture = str(params.pop("architecture", "")) if job.backend == "torch" else ""
        source = ModelSource(
            label=mv.ref, artifact=artifact, sha256=mv.artifacts[artifact].sha256, backend=job.backend,
            signature=Signature((), ()), ref=mv.ref, registry=registry_uri, artifacts=artifacts_uri,
            architecture=architecture, hparams=params if architecture else {}, settings=job.settings,
        )
        if mv.signature:
            return msgspec.structs.replace(source, signature=msgspec.convert(mv.signature, Signature))
        return msgspec.structs.replace(source, signature=_signature_of(source))
    finally:
        reg.close()


def _signature_of(source: ModelSource) -> Signature:
    # read on the CPU whatever runs it later: a TensorRT model's .onnx file
    # has the same signature under ONNX Runtime
    cpu = "onnxruntime" if source.backend == "tensorrt" else source.backend
    backend = load(msgspec.structs.replace(source, backend=cpu), threads=1, gpu=False)
    return backend.signature


def local_file(source: ModelSource) -> str:
    """The model file on this node, checked against the sha256 the driver
    resolved (IntegrityError when the bytes differ)."""
    if source.path:
        if not os.path.isfile(source.path):
            raise ConfigError(f"model file {source.path} is not on this node ({os.uname().nodename})")
        path = source.path
    else:
        from flywheel.registry import Registry

        reg = Registry.open(source.registry, source.artifacts)
        try:
            path = reg.artifact_path(source.ref, source.artifact)[1]  # verifies the registry's sha256
        finally:
            reg.close()
    got = file_sha256(path)
    if got != source.sha256:
        raise IntegrityError(f"model {source.label}: {path} has sha256 {got[:16]}..., the run resolved "
                             f"{source.sha256[:16]}...; refusing to score with other bytes")
    return path


# rows per model call by backend: ONNX Runtime and torch on a CPU amortise
# their per-call cost by 8192 rows; a TensorRT engine is built for the batch
# profile it will see, and a larger profile costs GPU memory and build time
_BATCH_ROWS = {"tensorrt": 1024}
DEFAULT_BATCH_ROWS = 8192


def batch_rows(backend: str, wanted: int) -> int:
    """Rows per model call: ``wanted``, or the backend's default."""
    return wanted or _BATCH_ROWS.get(backend, DEFAULT_BATCH_ROWS)


def model_config(source: ModelSource, path: str, *, threads: int, gpu: bool, rows: int):
    """The serving model config that the backend registry builds ``source``
    from: ONNX Runtime on the CUDA provider when the actor has a GPU, a
    TensorRT engine profiled for ``rows``-row batches."""
    from flywheel.runtime.backends.onnx_backend import OnnxRuntimeConfig
    from flywheel.runtime.batcher import BatchingConfig
    from flywheel.serving.config import ModelConfig

    extra = {}
    if source.backend == "tensorrt":
        from flywheel.runtime.backends.tensorrt_plan import TensorRTConfig

        extra["tensorrt"] = TensorRTConfig(min_batch=1, opt_batch=rows, max_batch=rows)
    # the model's messages name it as the run does (a config name has no "/")
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", source.label).lstrip("_.-")[:128] or "model"
    return ModelConfig(
        name=name, path=path, backend=source.backend, architecture=source.architecture,
        hparams=dict(source.hparams), settings=dict(source.settings), batching=BatchingConfig(max_batch_size=rows),
        onnxruntime=OnnxRuntimeConfig(providers=("cuda", "cpu") if gpu else ("cpu",), intra_op_threads=threads),
        **extra,
    )


def load(source: ModelSource, *, threads: int, gpu: bool, rows: int = DEFAULT_BATCH_ROWS) -> Backend:
    """The loaded backend, built by the backend registry as serving builds it."""
    path = local_file(source)
    backend = get_backend(source.backend).create(
        path, model_config(source, path, threads=threads, gpu=gpu, rows=rows))
    backend.load()
    return backend
