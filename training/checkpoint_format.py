"""The format of one checkpoint folder, ``step-<n>/``: a :class:`TrainState`
to the bytes of its files and back, and the checks that a folder's files are
the ones its manifest names. No I/O here (training/checkpoint.py reads and
writes); nothing is ever unpickled.

Files of a folder::

    model.safetensors        the full model state_dict; keys are parameter FQNs
    optimizer.safetensors    the optimizer's tensor leaves ("state/<key>/<name>")
    state.safetensors        the other tensor leaves ("rng/torch", "scheduler/...")
    state.json               everything else, and the manifest: sha256 and size per file

Tensors are safetensors, everything else JSON with a few tagged forms
(``{"$tuple": [...]}``, ``{"$dict": [[key, value], ...]}`` for non-string
keys, ``{"$tensor": key}``, ``{"$float": "nan"}``) so that nested optimizer,
scheduler and RNG states come back with their exact types.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as _st_save

from flywheel.protocol.errors import IntegrityError, InvalidInputError
from flywheel.training.train_state import TrainState

FORMAT = "flywheel-checkpoint"
VERSION = 1
MODEL_FILE, OPTIM_FILE, TENSORS_FILE = "model.safetensors", "optimizer.safetensors", "state.safetensors"
STATE_FILE = "state.json"
FILES = (MODEL_FILE, OPTIM_FILE, TENSORS_FILE)


def dir_name(step: int) -> str:
    """The folder name of ``step``'s checkpoint."""
    return f"step-{step:09d}"


# ---------------------------------------------------------------- tree codec


class _Encoder:
    """Turns a nested value into JSON, moving tensor and ndarray leaves into
    ``self.tensors`` under path-derived keys (unique within one file)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def encode(self, value: Any, path: list[str]) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            # JSON has no NaN/inf (ReduceLROnPlateau's "best" starts at inf).
            return float(value) if math.isfinite(value) else {"$float": repr(float(value))}
        if isinstance(value, np.generic):
            return self.encode(value.item(), path)
        if isinstance(value, torch.Tensor):
            return {"$tensor": self._add(_plain_tensor(value, path), path)}
        if isinstance(value, np.ndarray):
            try:
                t = torch.from_numpy(np.ascontiguousarray(value))
            except TypeError as exc:
                raise InvalidInputError(f"{_where(path)}: NumPy dtype {value.dtype} cannot be saved ({exc})") from None
            return {"$ndarray": self._add(t, path)}
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        if isinstance(value, tuple):
            return {"$tuple": [self.encode(v, [*path, str(i)]) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, [*path, str(i)]) for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in value):
                return {k: self.encode(v, [*path, k]) for k, v in value.items()}
            # Non-string keys (plain optimizer.state_dict() uses int parameter ids):
            # keep them typed, since JSON objects would turn 0 into "0".
            return {"$dict": [[self._key(k, path), self.encode(v, [*path, str(k)])] for k, v in value.items()]}
        raise InvalidInputError(
            f"{_where(path)}: a {type(value).__name__} cannot be saved in a checkpoint "
            "(JSON scalars, lists, tuples, dicts, tensors and NumPy arrays only)"
        )

    def _key(self, key: Any, path: list[str]) -> Any:
        if isinstance(key, (torch.Tensor, np.ndarray, list, dict)):
            raise InvalidInputError(f"{_where(path)}: a {type(key).__name__} dict key cannot be saved")
        return self.encode(key, path)

    def _add(self, tensor: torch.Tensor, path: list[str]) -> str:
        key = base = "/".join(path)
        n = 1
        while key in self.tensors:  # e.g. int key 0 and str key "0" in one dict
            n += 1
            key = f"{base}#{n}"
        self.tensors[key] = tensor
        return key


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, body),) = value.items()
        if tag.startswith("$"):  # plain dicts are only written without "$" keys
            if tag == "$tensor":
                return tensors[body]
            if tag == "$ndarray":
                return tensors[body].numpy()
            if tag == "$tuple":
                return tuple(_decode(v, tensors) for v in body)
            if tag == "$dict":
                return {_decode(k, tensors): _decode(v, tensors) for k, v in body}
            if tag == "$float":
                return float(body)
            if tag == "$dtype":
                dtype = getattr(torch, body)
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(f"unknown dtype {body!r}")
                return dtype
            raise ValueError(f"unknown tag {tag!r}")
    return {k: _decode(v, tensors) for k, v in value.items()}


def _where(path: list[str]) -> str:
    return ".".join(path) or "<root>"


def _plain_tensor(t: torch.Tensor, path: list[str]) -> torch.Tensor:
    t = t.detach()  # a Parameter detaches to a plain tensor; a DTensor stays a DTensor
    if type(t) is not torch.Tensor:
        raise InvalidInputError(
            f"{_where(path)}: a {type(t).__name__} is sharded; gather it first with full_state_dicts()"
        )
    return t.cpu()


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors wants each tensor to own a dense storage: copy the ones
    that are strided, a view into a bigger buffer, or share one (tied weights)."""
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        if t.numel():
            storage = t.untyped_storage()
            if not t.is_contiguous() or storage.data_ptr() in seen or storage.nbytes() != t.nbytes:
                t = t.clone(memory_format=torch.contiguous_format)
            seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return _st_save(out)


# ------------------------------------------------------------- folder format


def read_doc(name: str, raw: bytes) -> dict[str, Any]:
    """The parsed ``state.json`` of folder ``name``; IntegrityError when it is
    not one this version wrote for that folder."""
    try:
        doc = json.loads(raw)
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} v{VERSION} state.json")
        if dir_name(doc["step"]) != name:
            raise ValueError(f"it says step {doc['step']}")
        files = doc["files"]
        if set(files) != set(FILES):
            raise ValueError(f"its manifest lists {sorted(files)}")
        for meta in files.values():
            if not isinstance(meta["sha256"], str) or not isinstance(meta["bytes"], int):
                raise ValueError("a manifest entry lacks sha256 or bytes")
        return doc
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"{name}/{STATE_FILE} is invalid: {exc}") from None


def check_file(name: str, file: str, meta: dict[str, Any], sha256: str, size: int) -> None:
    """IntegrityError unless ``sha256`` and ``size`` (of ``name/file`` as read)
    are what the manifest entry ``meta`` recorded."""
    if size != meta["bytes"] or sha256 != meta["sha256"]:
        raise IntegrityError(
            f"{name}/{file} does not match its manifest (sha256 {sha256[:12]}..., {size} bytes; "
            f"recorded {meta['sha256'][:12]}..., {meta['bytes']} bytes)"
        )


def check_state(state: TrainState) -> int:
    """Fail before writing anything; returns the step the state is saved as."""
    if not isinstance(state, TrainState):
        raise InvalidInputError(f"save() takes a TrainState, got {type(state).__name__}")
    for name, kind in (("model", dict), ("optimizer", dict), ("scheduler", dict), ("counters", dict),
                       ("rng", dict), ("metrics", list), ("extra", dict)):
        got = getattr(state, name)
        if not isinstance(got, kind):
            raise InvalidInputError(f"TrainState.{name} must be a {kind.__name__}, got {type(got).__name__}")
    for key, value in state.counters.items():
        if not isinstance(key, str) or not isinstance(value, int) or isinstance(value, bool):
            raise InvalidInputError(f"TrainState.counters[{key!r}] must be an int under a str key, got {value!r}")
    step = state.counters.get("global_step")
    if step is None or step < 0:
        raise InvalidInputError(
            f"TrainState.counters['global_step'] must be an int >= 0 (it names the checkpoint), got {step!r}"
        )
    if not state.model:
        raise InvalidInputError("TrainState.model is empty: save on rank 0, where full_state_dicts() gathers it")
    for key, value in state.model.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InvalidInputError(
                f"TrainState.model[{key!r}] must be a tensor under a str key, got {type(value).__name__}"
            )
    return step


def serialize(state: TrainState, step: int) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(state.json's document, file name -> bytes) of ``state`` saved as
    ``step`` (checked by :func:`check_state` first). InvalidInputError names a
    value that cannot be saved."""
    model = {k: _plain_tensor(v, ["model", k]) for k, v in state.model.items()}
    optim = _Encoder()  # keys relative to the optimizer dict: "state/<key>/<name>"
    other = _Encoder()  # keys prefixed by section: "rng/torch"
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "saved_at": time.time(),
        "counters": dict(state.counters),
        "model_keys": list(model),  # safetensors sorts its keys; state_dict order is kept here
        "optimizer": optim.encode(state.optimizer, []),
    }
    for section in ("scheduler", "rng", "metrics", "extra"):
        doc[section] = other.encode(getattr(state, section), [section])
    blobs = {MODEL_FILE: _safetensors_bytes(model), OPTIM_FILE: _safetensors_bytes(optim.tensors),
             TENSORS_FILE: _safetensors_bytes(other.tensors)}
    doc["files"] = {n: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for n, b in blobs.items()}
    return doc, blobs


def deserialize(doc: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]) -> TrainState:
    """The TrainState of a checked ``doc`` (:func:`read_doc`) and its files'
    tensors (file name -> safetensors' dict). ValueError, KeyError or
    TypeError when they do not decode."""
    model_t = tensors[MODEL_FILE]
    if set(model_t) != set(doc["model_keys"]):
        raise ValueError("model.safetensors keys differ from model_keys")
    counters = doc["counters"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in counters.values()):
        raise ValueError("counters must be ints")
    other = tensors[TENSORS_FILE]
    return TrainState(
        model={k: model_t[k] for k in doc["model_keys"]},
        optimizer=_decode(doc["optimizer"], tensors[OPTIM_FILE]),
        scheduler=_decode(doc["scheduler"], other),
        counters=counters,
        rng=_decode(doc["rng"], other),
        metrics=_decode(doc["metrics"], other),
        extra=_decode(doc["extra"], other),
    )
