"""Training checkpoints that are never half-written, restore exactly and load
without running code.

Layout under ``root`` (a local folder or an fsspec URI)::

    root/
      LATEST                     {"step": 37, "dir": "step-000000037"}
      step-000000037/
        model.safetensors        the full model state_dict; keys are parameter FQNs
        optimizer.safetensors    the optimizer's tensor leaves ("state/<key>/<name>")
        state.safetensors        the other tensor leaves ("rng/torch", "scheduler/...")
        state.json               everything else, and the manifest: sha256 and size per file
      .tmp-step-000000040-<hex>/ a save in progress, or abandoned by a crash
      .old-step-000000037-<hex>/ a checkpoint being replaced by a new save of its step

A save writes a hidden ``.tmp-*`` folder, then renames it to ``step-<n>``, then
rewrites ``LATEST``; a folder only counts once its ``state.json`` parses and
every file in its manifest has the recorded size and sha256. Nothing is ever
unpickled: tensors are safetensors, everything else JSON with a few tagged
forms (``{"$tuple": [...]}``, ``{"$dict": [[key, value], ...]}`` for non-string
keys, ``{"$tensor": key}``, ``{"$float": "nan"}``) so that nested optimizer,
scheduler and RNG states come back with their exact types.

No Ray here: Ray Train workers call this, and it is testable alone. One writer
per root (rank 0); readers may run beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from flywheel.protocol.errors import ConfigError, IntegrityError, InvalidInputError, NotFoundError

log = logging.getLogger(__name__)

FORMAT = "flywheel-checkpoint"
VERSION = 1
_MODEL, _OPTIM, _TENSORS = "model.safetensors", "optimizer.safetensors", "state.safetensors"
_STATE = "state.json"
_FILES = (_MODEL, _OPTIM, _TENSORS)
_STEP_DIR = re.compile(r"^step-(\d+)$")
_HIDDEN_DIR = re.compile(r"^\.(?:tmp|old)-step-(\d+)-[0-9a-f]+$")
_CHUNK = 1 << 20


@dataclass
class TrainState:
    """Everything needed to continue a training job exactly where it stopped.

    ``model``: full (unsharded) state_dict of CPU tensors. ``optimizer``: a full
    optimizer state dict, either DCP's shape (parameter FQN keys, see
    :func:`full_state_dicts`) or plain ``optimizer.state_dict()`` (int keys).
    ``scheduler``: ``lr_scheduler.state_dict()``. ``counters``: ints, must hold
    ``global_step`` (names the checkpoint). ``rng``: see :func:`capture_rng`.
    ``metrics``/``extra``: JSON-able history and anything else.
    """

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    counters: dict[str, int]
    rng: dict[str, Any]
    metrics: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)


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


# ------------------------------------------------------------------- storage


class _Storage:
    """The few file operations the store needs: on a local disk with fsync and
    atomic renames, elsewhere through fsspec (where a folder "rename" is a
    copy per object, so callers order the moves: state.json last)."""

    def __init__(self, root: str) -> None:
        import fsspec

        if "://" not in root:
            root = os.path.abspath(root)
        self.fs, self.root = fsspec.core.url_to_fs(root)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        self.local = "file" in protocols or "local" in protocols
        self.protocol = protocols[0]
        self.root = self.root.rstrip("/") or "/"

    def path(self, *parts: str) -> str:
        if self.local:
            return os.path.join(self.root, *parts)
        return "/".join([self.root, *parts])

    def uri(self, *parts: str) -> str:
        p = self.path(*parts)
        return p if self.local else f"{self.protocol}://{p}"

    def names(self, *parts: str) -> list[str]:
        try:
            if self.local:
                return os.listdir(self.path(*parts))
            self.fs.invalidate_cache(self.path(*parts))  # another process may have written
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path(*parts), detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self, *parts: str) -> bool:
        return os.path.exists(self.path(*parts)) if self.local else self.fs.exists(self.path(*parts))

    def makedirs(self, *parts: str) -> None:
        if self.local:
            os.makedirs(self.path(*parts), exist_ok=True)
        else:
            self.fs.makedirs(self.path(*parts), exist_ok=True)

    def read(self, *parts: str) -> bytes:
        if self.local:
            with open(self.path(*parts), "rb") as f:
                return f.read()
        return self.fs.cat_file(self.path(*parts))

    def digest(self, *parts: str) -> tuple[str, int]:
        h, size = hashlib.sha256(), 0
        opener = open if self.local else self.fs.open
        with opener(self.path(*parts), "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
        return h.hexdigest(), size

    def write(self, data: bytes, *parts: str) -> None:
        if self.local:
            with open(self.path(*parts), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        else:
            self.fs.pipe_file(self.path(*parts), data)

    def sync_dir(self, *parts: str) -> None:
        """Make a rename or a new file durable (local only; some filesystems refuse)."""
        if not self.local:
            return
        try:
            fd = os.open(self.path(*parts), os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def move_dir(self, src: str, dst: str, order: list[str]) -> None:
        """Move folder ``src`` to ``dst`` (which must not exist); ``order`` is
        the file order for non-atomic filesystems."""
        if self.local:
            os.rename(self.path(src), self.path(dst))
            self.sync_dir()
            return
        for name in order:
            self.fs.mv(self.path(src, name), self.path(dst, name))
        self.remove_dir(src)

    def replace_file(self, src: str, dst: str) -> None:
        if self.local:
            os.replace(self.path(src), self.path(dst))
            self.sync_dir()
        else:
            self.fs.mv(self.path(src), self.path(dst))

    def remove_file(self, *parts: str) -> None:
        try:
            if self.local:
                os.remove(self.path(*parts))
            else:
                self.fs.rm_file(self.path(*parts))
        except FileNotFoundError:
            pass

    def remove_dir(self, name: str, *, best_effort: bool = False) -> None:
        try:
            if self.local:
                shutil.rmtree(self.path(name))
            else:
                self.fs.rm(self.path(name), recursive=True)
        except FileNotFoundError:
            pass
        except OSError:
            if not best_effort:  # cleaning up after an error must not hide it
                raise
            log.warning("could not remove %s; prune() will", self.uri(name), exc_info=True)


# --------------------------------------------------------------------- store


def _dir_name(step: int) -> str:
    return f"step-{step:09d}"


class CheckpointStore:
    """Checkpoints of one training job under ``root`` (a local folder or an
    fsspec URI such as ``memory://job`` or ``s3://bucket/job``).

    Guarantees: a reader never gets a half-written or corrupted checkpoint
    (every file is checked against the sha256 in the manifest when loaded);
    on a local disk a save is atomic (rename) and durable (fsync). On object
    stores a save becomes visible file by file, state.json last, so a folder
    caught mid-move fails its manifest check and is skipped.

    Not thread-safe; one writer per root (rank 0).
    """

    def __init__(self, root: str) -> None:
        if not isinstance(root, str) or not root:
            raise ConfigError(f"checkpoint root must be a folder path or an fsspec URI, got {root!r}")
        self.root = root
        self._st = _Storage(root)
        # folder name -> sha256 of a state.json whose files were verified: a
        # committed folder never changes, so steps()/prune() hash each once.
        self._verified: dict[str, str] = {}

    # -- writing

    def save(self, state: TrainState) -> str:
        """Write ``state`` as ``step-<counters["global_step"]>`` and point
        ``LATEST`` at it (LATEST names the most recently saved checkpoint,
        even when an older step is saved again). Saving an existing step
        replaces it: the new folder is complete before the old one moves aside.
        Returns the checkpoint's path (a URI for fsspec roots).

        Raises InvalidInputError for a value that cannot be saved (the
        message names it), e.g. a sharded tensor or an empty model (only
        rank 0 holds the gathered state).
        """
        step = _check_state(state)
        doc, blobs = _serialize(state, step)
        raw = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
        final = _dir_name(step)
        tmp = f".tmp-{final}-{uuid.uuid4().hex[:12]}"
        order = [*_FILES, _STATE]  # state.json last: it is what makes a folder count
        try:
            self._st.makedirs(tmp)
            for name in _FILES:
                self._st.write(blobs[name], tmp, name)
            self._st.write(raw, tmp, _STATE)
            self._st.sync_dir(tmp)
            if self._st.exists(final):
                self._swap(tmp, final, order)
            else:
                self._st.move_dir(tmp, final, order)
        except Exception:
            # An error (disk full, network) cleans up; a crash leaves the
            # .tmp folder for prune().
            self._st.remove_dir(tmp, best_effort=True)
            raise
        self._verified[final] = hashlib.sha256(raw).hexdigest()
        self._st.write(json.dumps({"step": step, "dir": final}).encode(), "LATEST.tmp")
        self._st.replace_file("LATEST.tmp", "LATEST")
        return self._st.uri(final)

    def _swap(self, tmp: str, final: str, order: list[str]) -> None:
        """Replace folder ``final`` by the complete ``tmp``. Between the two
        moves ``final`` is absent (readers fall back to an older step); a
        crash there leaves both copies in hidden folders of step n, which
        prune() keeps while n is newer than every complete checkpoint."""
        old = f".old-{final}-{uuid.uuid4().hex[:12]}"
        # state.json first, so that the displaced copy stops counting at once
        self._st.move_dir(final, old, [_STATE, *(n for n in self._st.names(final) if n != _STATE)])
        try:
            self._st.move_dir(tmp, final, order)
        except Exception:
            if not self._st.exists(final):  # put the previous checkpoint back
                self._st.move_dir(old, final, order)
            raise
        self._st.remove_dir(old)

    # -- reading

    def latest(self) -> TrainState | None:
        """The newest complete checkpoint: the one LATEST names, else (LATEST
        missing, unreadable, or naming a missing or corrupt folder: logged as a
        warning) the complete ``step-*`` folder with the highest step. None
        when there is none."""
        pointer = self._pointer()
        problem = pointer if isinstance(pointer, str) else None
        if isinstance(pointer, tuple):
            try:
                return self._load_dir(pointer[1])
            except (FileNotFoundError, IntegrityError) as exc:
                problem = f"LATEST names {pointer[1]}, which cannot be loaded ({exc})"
        for _, name in sorted(self._step_dirs(), reverse=True):
            if isinstance(pointer, tuple) and name == pointer[1]:
                continue
            try:
                state = self._load_dir(name)
            except (FileNotFoundError, IntegrityError) as exc:
                log.warning("checkpoint %s under %s is incomplete or corrupt, skipped: %s", name, self.root, exc)
                continue
            log.warning("%s; falling back to %s under %s", problem, name, self.root)
            return state
        if problem is not None:
            log.warning("%s, and no complete checkpoint exists under %s", problem, self.root)
        return None

    def load(self, step: int) -> TrainState:
        """The checkpoint of ``step``. Raises NotFoundError when there is none,
        IntegrityError when it is incomplete or fails its sha256 check."""
        name = _dir_name(step)
        if not self._st.exists(name):
            raise NotFoundError(f"no checkpoint for step {step} under {self.root} (have {self.steps()})")
        try:
            return self._load_dir(name)
        except FileNotFoundError as exc:
            raise IntegrityError(f"checkpoint {name} under {self.root} is incomplete: {exc}") from None

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints (manifest verified), ascending."""
        return sorted(step for step, name in self._step_dirs() if self._complete(name))

    def prune(self, keep: int) -> list[str]:
        """Keep the ``keep`` newest complete checkpoints and the one LATEST
        names; remove the other complete ones, incomplete ``step-*`` folders
        older than the newest complete one, and hidden ``.tmp-*``/``.old-*``
        folders of a step up to the newest complete one (a newer one may be a
        save in progress). Returns the removed paths."""
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ConfigError(f"prune(keep=...) must be an int >= 1, got {keep!r}")
        dirs = sorted(self._step_dirs())
        complete = [(step, name) for step, name in dirs if self._complete(name)]
        if not complete:
            return []  # nothing proves that any leftover is abandoned
        newest = complete[-1][0]
        complete_names = {name for _, name in complete}
        protected = {name for _, name in complete[-keep:]}
        pointer = self._pointer()
        if isinstance(pointer, tuple):
            protected.add(pointer[1])
        doomed = [name for step, name in dirs
                  if name not in protected and (name in complete_names or step < newest)]
        doomed += sorted(
            n for n in self._st.names() if (m := _HIDDEN_DIR.match(n)) and int(m.group(1)) <= newest
        )
        removed = []
        for name in doomed:
            # state.json first: the folder stops counting before its data goes
            self._st.remove_file(name, _STATE)
            self._st.remove_dir(name)
            self._verified.pop(name, None)
            removed.append(self._st.uri(name))
        return removed

    # -- internals

    def _step_dirs(self) -> list[tuple[int, str]]:
        out = []
        for name in self._st.names():
            m = _STEP_DIR.match(name)
            if m and name == _dir_name(int(m.group(1))):
                out.append((int(m.group(1)), name))
        return out

    def _pointer(self) -> tuple[int, str] | str | None:
        """(step, dir) from LATEST; a string saying what is wrong with it; None
        on an empty root."""
        try:
            raw = self._st.read("LATEST")
        except FileNotFoundError:
            return "LATEST is missing" if self._step_dirs() else None
        try:
            doc = json.loads(raw)
            step, name = doc["step"], doc["dir"]
            if not isinstance(step, int) or name != _dir_name(step):
                raise ValueError("step and dir disagree")
        except (ValueError, KeyError, TypeError) as exc:
            return f"LATEST is unreadable ({exc})"
        return step, name

    def _read_doc(self, name: str, raw: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT or doc.get("version") != VERSION:
                raise ValueError(f"not a {FORMAT} v{VERSION} state.json")
            if _dir_name(doc["step"]) != name:
                raise ValueError(f"it says step {doc['step']}")
            files = doc["files"]
            if set(files) != set(_FILES):
                raise ValueError(f"its manifest lists {sorted(files)}")
            for meta in files.values():
                if not isinstance(meta["sha256"], str) or not isinstance(meta["bytes"], int):
                    raise ValueError("a manifest entry lacks sha256 or bytes")
            return doc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"{name}/{_STATE} is invalid: {exc}") from None

    def _complete(self, name: str) -> bool:
        try:
            raw = self._st.read(name, _STATE)
            digest = hashlib.sha256(raw).hexdigest()
            if self._verified.get(name) == digest:
                return True
            doc = self._read_doc(name, raw)
            for file, meta in doc["files"].items():
                _check(name, file, meta, *self._st.digest(name, file))
        except (FileNotFoundError, IntegrityError):
            # Only definite answers: a transient I/O error must propagate, or
            # prune() would delete a good checkpoint.
            return False
        self._verified[name] = digest
        return True

    def _load_dir(self, name: str) -> TrainState:
        raw = self._st.read(name, _STATE)
        doc = self._read_doc(name, raw)
        tensors = {}
        for file, meta in doc["files"].items():
            data = self._st.read(name, file)
            _check(name, file, meta, hashlib.sha256(data).hexdigest(), len(data))
            tensors[file] = _st_load(data)
        try:
            state = _deserialize(doc, tensors)
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{name} does not decode: {exc!r}") from None
        self._verified[name] = hashlib.sha256(raw).hexdigest()
        return state


def _check(name: str, file: str, meta: dict[str, Any], sha256: str, size: int) -> None:
    if size != meta["bytes"] or sha256 != meta["sha256"]:
        raise IntegrityError(
            f"{name}/{file} does not match its manifest (sha256 {sha256[:12]}..., {size} bytes; "
            f"recorded {meta['sha256'][:12]}..., {meta['bytes']} bytes)"
        )


def _check_state(state: TrainState) -> int:
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


def _serialize(state: TrainState, step: int) -> tuple[dict[str, Any], dict[str, bytes]]:
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
    blobs = {_MODEL: _safetensors_bytes(model), _OPTIM: _safetensors_bytes(optim.tensors),
             _TENSORS: _safetensors_bytes(other.tensors)}
    doc["files"] = {n: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for n, b in blobs.items()}
    return doc, blobs


def _deserialize(doc: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]) -> TrainState:
    model_t = tensors[_MODEL]
    if set(model_t) != set(doc["model_keys"]):
        raise ValueError("model.safetensors keys differ from model_keys")
    counters = doc["counters"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in counters.values()):
        raise ValueError("counters must be ints")
    other = tensors[_TENSORS]
    return TrainState(
        model={k: model_t[k] for k in doc["model_keys"]},
        optimizer=_decode(doc["optimizer"], tensors[_OPTIM]),
        scheduler=_decode(doc["scheduler"], other),
        counters=counters,
        rng=_decode(doc["rng"], other),
        metrics=_decode(doc["metrics"], other),
        extra=_decode(doc["extra"], other),
    )


# ------------------------------------------------------------ state helpers


def capture_rng() -> dict[str, Any]:
    """The RNG states that decide a training step: torch (CPU), Python's
    ``random``, NumPy's legacy global generator, and CUDA's per-device states
    when CUDA is already initialized (never initializes it). Per process: in
    a multi-rank job, rank 0's states are what a rank-0 save records."""
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    """Set the RNG states in ``rng`` (as from :func:`capture_rng`, possibly
    restored from a checkpoint); absent ones are left alone."""
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "python" in rng:
        random.setstate(rng["python"])
    if "numpy" in rng:
        np.random.set_state(rng["numpy"])
    if "cuda" in rng and torch.cuda.is_available():  # as many devices as this process sees
        torch.cuda.set_rng_state_all(list(rng["cuda"])[: torch.cuda.device_count()])


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) full state dicts on CPU, for DDP, FSDP2 and plain
    modules alike: DCP's get_model/optimizer_state_dict with
    ``full_state_dict=True, cpu_offload=True``. Optimizer state is keyed by
    parameter FQN (``{"state": {fqn: {...}}, "param_groups": [{"params": [fqn, ...]}]}``).

    Collective under a process group: every rank must call it; only rank 0
    gets the dicts, the other ranks get empty ones (DCP gathers to rank 0 when
    offloading to CPU). Without a process group (one process, tests) DCP skips
    the gather and returns the local state, so no fallback is needed.

    Caveat (DCP's, not ours): on an optimizer that has not stepped yet, DCP
    first creates its state with a zero-lr step on zero grads, so Adam's
    ``step`` becomes 1 before training starts. Checkpoint after the first
    step to keep a run identical to one that never checkpointed.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options))


def load_full_state_dicts(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_sd: dict[str, Any] | None,
    optim_sd: dict[str, Any] | None,
    *,
    rank: int,
) -> None:
    """Load full state dicts (from :func:`full_state_dicts` or a checkpoint)
    into ``model`` and ``optimizer``, resharding for FSDP2 as needed.

    Under a process group this is collective, with ``broadcast_from_rank0``:
    only rank 0 reads storage and passes the dicts; the other ranks may pass
    None or {} and receive the tensors by broadcast. ``rank`` must be this
    process's rank. Without a process group ``rank`` must be 0 and the dicts
    load directly (DCP's broadcast needs a group; ``full_state_dict`` alone
    does not). An optimizer state keyed by ints (plain
    ``optimizer.state_dict()``) is accepted without a process group only
    (``optimizer.load_state_dict``). The given dicts and their tensors are
    not modified or aliased afterwards (DCP rewrites the dicts it is handed
    and copies tensor values into the optimizer's own, so it gets copies).
    Raises ConfigError on a wrong ``rank``, missing dicts on rank 0, or an
    id-keyed optimizer state under a process group.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    grouped = dist.is_available() and dist.is_initialized()
    actual = dist.get_rank() if grouped else 0
    if rank != actual:
        raise ConfigError(f"load_full_state_dicts(rank={rank}) runs on rank {actual}"
                          + ("" if grouped else " (no process group is initialized)"))
    if rank == 0 and (not model_sd or not optim_sd):
        raise ConfigError("load_full_state_dicts: rank 0 must pass the model and optimizer state dicts")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=grouped)
    if rank != 0:
        set_model_state_dict(model, {}, options=options)
        set_optimizer_state_dict(model, optimizer, {}, options=options)
        return
    set_model_state_dict(model, dict(model_sd), options=options)
    if any(not isinstance(k, str) for k in optim_sd.get("state", {})) or any(
        not isinstance(p, str) for g in optim_sd.get("param_groups", []) for p in g.get("params", [])
    ):
        # Plain optimizer.state_dict() (int parameter ids): DCP only reads FQN
        # keys, and ids say nothing about sharding, so only one process can
        # take it. Clone: the optimizer would otherwise update our tensors in place.
        if grouped:
            raise ConfigError("an optimizer state keyed by parameter ids cannot be loaded under a process "
                              "group; save it with full_state_dicts() (keys are parameter FQNs)")
        optimizer.load_state_dict(_copy_structure(optim_sd, clone=True))
        return
    set_optimizer_state_dict(model, optimizer, _copy_structure(optim_sd), options=options)


def _copy_structure(value: Any, clone: bool = False) -> Any:
    if isinstance(value, dict):
        return {k: _copy_structure(v, clone) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_structure(v, clone) for v in value]
    if clone and isinstance(value, torch.Tensor):
        return value.clone()
    return value
