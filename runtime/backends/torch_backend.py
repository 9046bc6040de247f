"""PyTorch backend (``backend: torch``): a torch module plus safely loaded
weights (.safetensors). torch is imported by ``load()`` only.

The module is either

- a built-in architecture: ``architecture`` (a name from
  runtime/architectures.py) and ``hparams``; ``path`` is the weights file
  (or a folder holding ``model.safetensors``); or
- a user model: ``torch.factory`` (``"module:function"``, called with
  ``torch.kwargs``) builds it, e.g. a model trained from a job's
  ``model.factory`` that did not export to ONNX::

      - name: ranker
        ref: ranker/3
        artifact: model.safetensors
        backend: torch
        torch: {factory: "nets:make_ranker"}   # kwargs: the version's, unless given

  A factory model loads a folder: a registry ``ref`` gives every artifact
  of the version in one folder, a ``path`` names a folder laid out the
  same way. In it: the weights (``artifact``, by default
  ``model.safetensors``), ``torch_model.json`` (:class:`FactoryManifest`:
  the signature served, the factory's recorded kwargs, the name of the code
  artifact), and the code, ``code.zip``, the job's ``code`` folder packed
  (training/model_artifacts.py writes all three).

Where a factory's code comes from, and what is trusted: only the factory
that the deploy config names in ``torch.factory`` is imported; the factory a
version records is never run by itself (a config that says ``backend:
torch`` and names no factory must name an ``architecture``), so that what
runs is what the reviewed deploy config shows, as for ``python.class``. Its
module comes from the version's code (``code.zip`` unpacked into a private
temporary folder, removed on close) when that holds it, else from the
model's folder, else from the installed packages; modules imported from a
folder are not left in ``sys.modules`` (runtime/backends/user_code.py).
Nothing is unpickled: weights are safetensors, the manifest is JSON.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import msgspec
import numpy as np

from flywheel.protocol.errors import ConfigError, FlywheelError, IntegrityError
from flywheel.runtime.architectures import build
from flywheel.runtime.backends.base import Backend, refuse_pickle
from flywheel.runtime.backends.registry import BackendSpec, ConfigField
from flywheel.runtime.backends.user_code import CLASS_PATH, check_outputs, import_object, warm_up_or_refuse
from flywheel.runtime.extras import require_extra
from flywheel.runtime.signature import Signature, signature_from_doc

__all__ = ["CODE_ARTIFACT", "MANIFEST", "WEIGHTS", "FactoryManifest", "TorchBackend", "TorchModelConfig",
           "load_state_dict"]

WEIGHTS = "model.safetensors"
MANIFEST = "torch_model.json"
CODE_ARTIFACT = "code.zip"
# code, not data (training/code_package.py refuses bigger folders)
_MAX_CODE_BYTES = 100 * 1024 * 1024


class TorchModelConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The model config's ``torch:`` block (backend torch, user models).

    factory: ``"module:function"`` (or ``module:Class``) that returns the
        torch.nn.Module the weights load into.
    kwargs: keyword arguments of the factory; unset = the kwargs recorded
        with the version (its ``torch_model.json``).
    """

    factory: str = ""
    kwargs: dict[str, Any] | None = None


class FactoryManifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``torch_model.json``: how a factory model's weights are served.

    factory / kwargs: what built the module the weights were trained in.
    input_shape: one input row's shape (the signature's first input less its
        batch axis).
    signature: ``{"inputs": [...], "outputs": [...]}`` of ``{name,
        datatype, shape}``; forward takes the inputs positionally, in order.
    code: the artifact holding the factory's code (a zip), "" when it comes
        from the installed packages.
    """

    factory: str
    kwargs: dict[str, Any]
    input_shape: list[int]
    signature: dict[str, Any]
    code: str = ""
    format: int = 1

    def encode(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self), indent=1)


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
    """A torch module rebuilt from an architecture (or a user factory) and
    safetensors weights."""

    platform = "pytorch_safetensors"

    def __init__(
        self,
        weights: str,
        architecture: str = "",
        hparams: Mapping[str, Any] | None = None,
        *,
        factory: TorchModelConfig | None = None,
        name: str = "",
        artifact: str = WEIGHTS,
    ) -> None:
        """``weights``: the .safetensors file, or a folder holding it as
        ``artifact`` (a factory model: the folder with its manifest and
        code). ConfigError when it does not exist."""
        self._label = f"model {name!r}" if name else "the torch model"
        self._factory = factory if factory is not None and factory.factory else None
        if os.path.isdir(weights):
            self._folder = weights
            self._weights = os.path.join(weights, artifact)
        else:
            self._folder = os.path.dirname(os.path.abspath(weights))
            self._weights = weights
        if not os.path.isfile(self._weights):
            raise ConfigError(f"{self._label}: weights file {self._weights!r} does not exist")
        self._arch = architecture
        self._hparams = dict(hparams or {})
        self._module = None
        self._signature: Signature | None = None
        self._code_dir = ""

    def load(self) -> None:
        require_extra("train", ("torch",), "backend 'torch'")
        import torch

        self._torch = torch
        if self._factory is None:
            module, self._signature = build(self._arch, self._hparams)
            module.load_state_dict(load_state_dict(self._weights))
        else:
            module = self._load_factory_model(torch)
        module.eval()
        self._module = module

    def _load_factory_model(self, torch):
        cfg = self._factory
        manifest = self._manifest()
        kwargs = dict(manifest.kwargs if cfg.kwargs is None else cfg.kwargs)
        factory = self._import_factory(manifest)
        where = f"{self._label}: torch.factory {cfg.factory!r}"
        try:
            module = factory(**kwargs)
        except Exception as exc:  # noqa: BLE001 - the user's factory may raise anything
            raise ConfigError(f"{where} with torch.kwargs {kwargs} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(module, torch.nn.Module):
            raise ConfigError(f"{where} returned a {type(module).__name__}; expected a torch.nn.Module")
        try:
            module.load_state_dict(load_state_dict(self._weights))
        except RuntimeError as exc:  # missing / unexpected keys, shape mismatches
            first = str(exc).strip().splitlines()
            raise ConfigError(f"{where} with torch.kwargs {kwargs} builds a module the weights "
                              f"{os.path.basename(self._weights)} do not fit: {' '.join(first[:3])}") from None
        try:
            self._signature = signature_from_doc(manifest.signature)
        except FlywheelError as exc:
            raise ConfigError(f"{self._label}: {MANIFEST} holds no valid signature: {exc.message}") from None
        return module

    def _manifest(self) -> FactoryManifest:
        path = os.path.join(self._folder, MANIFEST)
        if not os.path.isfile(path):
            raise ConfigError(
                f"{self._label}: torch.factory needs {MANIFEST} beside the weights in {self._folder} (the signature "
                "served and the factory's kwargs; training registers it with a factory model's weights)"
            )
        try:
            with open(path, "rb") as f:
                return msgspec.json.decode(f.read(), type=FactoryManifest)
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{self._label}: {MANIFEST} in {self._folder}: {exc}") from None

    def _import_factory(self, manifest: FactoryManifest):
        target = self._factory.factory
        field = f"{self._label}: torch.factory {target!r}"
        folders = []
        if manifest.code:
            self._code_dir = _unpack(os.path.join(self._folder, manifest.code), self._label)
            folders.append(self._code_dir)
        folders.append(self._folder)
        obj = import_object(target, folders, field=f"{self._label}: torch.factory",
                            expected="a function that returns a torch.nn.Module")
        if not callable(obj):
            raise ConfigError(f"{field} is a {type(obj).__name__}; expected a function that returns a "
                              "torch.nn.Module")
        return obj

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        args = [torch.from_numpy(np.ascontiguousarray(inputs[s.name])) for s in self._signature.inputs]
        with torch.inference_mode():
            out = self._module(*args)
        if not isinstance(out, (tuple, list)):
            out = (out,)
        if self._factory is None:  # a built-in architecture answers as its signature says
            return {s.name: t.numpy() for s, t in zip(self._signature.outputs, out)}
        # a user's module may answer other counts, dtypes or shapes than the
        # version's recorded signature: say so rather than serve it mislabelled
        specs = self._signature.outputs
        if len(out) != len(specs):
            raise FlywheelError(f"{self._label}: torch.factory {self._factory.factory!r}: forward returned "
                                f"{len(out)} tensor(s); expected {len(specs)} ({[s.name for s in specs]}, "
                                f"the version's signature)")
        first = next(iter(inputs.values()), None)
        rows = int(first.shape[0]) if first is not None and first.ndim and self._signature.batchable else None
        return check_outputs({s.name: t.numpy() for s, t in zip(specs, out)}, specs, rows, label=self._label,
                             what="forward", field="the version's signature", indexed=False)

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """As Backend's; a factory model that answers off its signature on
        the warm-up inputs fails the load (ConfigError)."""
        if self._factory is None:
            super().warmup(batch_sizes)
        else:
            warm_up_or_refuse(self, batch_sizes)

    def close(self) -> None:
        """Remove the unpacked code (its modules stay loaded while used)."""
        if self._code_dir:
            shutil.rmtree(self._code_dir, ignore_errors=True)
            self._code_dir = ""


def _unpack(archive: str, label: str) -> str:
    """Unpack the code zip into a new private folder; the folder to import
    from (the zip's single top folder when it has one, as Ray unpacks it)."""
    if not os.path.isfile(archive):
        raise ConfigError(f"{label}: the code artifact {os.path.basename(archive)!r} named by {MANIFEST} "
                          f"is not in {os.path.dirname(archive)}")
    dest = tempfile.mkdtemp(prefix="flywheel-torch-code-")
    try:
        with zipfile.ZipFile(archive) as z:
            members = z.infolist()
            if sum(m.file_size for m in members) > _MAX_CODE_BYTES:
                raise ConfigError(f"{label}: {archive} unpacks to more than {_MAX_CODE_BYTES // 2**20} MiB; "
                                  "expected the model's code only")
            for m in members:
                parts = m.filename.replace("\\", "/").split("/")
                if m.filename.startswith("/") or ".." in parts:
                    raise ConfigError(f"{label}: {archive} holds {m.filename!r}, outside its own folder; refused")
            z.extractall(dest)
    except zipfile.BadZipFile as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise ConfigError(f"{label}: {archive} is not a zip file: {exc}") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    entries = os.listdir(dest)
    if len(entries) == 1 and os.path.isdir(os.path.join(dest, entries[0])):
        return os.path.join(dest, entries[0])
    return dest


def _create(path: str, model) -> TorchBackend:
    return TorchBackend(path, model.architecture, model.hparams, factory=model.torch, name=model.name,
                        artifact=model.artifact if model.artifact.endswith(".safetensors") else WEIGHTS)


def _validate(model) -> None:
    factory = model.torch.factory
    if model.architecture and factory:
        raise ConfigError("give 'architecture' (a built-in model) or torch.factory (a user model), not both")
    if not model.architecture and not factory:
        raise ConfigError("backend torch needs 'architecture' (a built-in model, with hparams) or torch.factory "
                          "('module:function', a user model)")
    if factory and not CLASS_PATH.match(factory):
        raise ConfigError(f"torch.factory {factory!r} must be an import path 'module:function' "
                          "(e.g. 'nets:make_ranker')")
    if model.ref and not model.artifact.endswith(".safetensors"):
        raise ConfigError(f"artifact {model.artifact!r}: backend torch loads safetensors weights; "
                          f"set artifact: {WEIGHTS}")


SPEC = BackendSpec(
    name="torch",
    create=_create,
    summary="safetensors weights of a registered architecture or a user factory (torch.factory), run by PyTorch",
    fields=(
        # not exclusive: other backends ignore them, as they always did
        ConfigField("architecture", str, "", exclusive=False),
        ConfigField("hparams", dict[str, Any], {}, exclusive=False),
        ConfigField("torch", TorchModelConfig, TorchModelConfig()),
    ),
    validate=_validate,
    # a factory model needs its manifest and code beside the weights: a
    # registry ref gives the version's artifacts as one folder
    folder=True,
)
