"""Training checkpoints that are never half-written, restore exactly and load
without running code: :class:`CheckpointStore`, the checkpoints of one job.

Layout under ``root`` (a local folder or an fsspec URI)::

    root/
      LATEST                     {"step": 37, "dir": "step-000000037"}
      step-000000037/            one checkpoint (files: training/checkpoint_format.py)
      .tmp-step-000000040-<hex>/ a save in progress, or abandoned by a crash
      .old-step-000000037-<hex>/ a checkpoint being replaced by a new save of its step

A save writes a hidden ``.tmp-*`` folder, then renames it to ``step-<n>``, then
rewrites ``LATEST``; a folder only counts once its ``state.json`` parses and
every file in its manifest has the recorded size and sha256.

What a checkpoint holds (:class:`~flywheel.training.train_state.TrainState`)
and how it is taken from a live model: training/train_state.py; the file
operations, local or fsspec: training/checkpoint_storage.py.

No Ray here: Ray Train workers call this, and it is testable alone. One writer
per root (rank 0); readers may run beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid

from safetensors.torch import load as _st_load

from flywheel.protocol.errors import ConfigError, IntegrityError, NotFoundError
from flywheel.training.checkpoint_format import (
    FILES,
    STATE_FILE,
    check_file,
    check_state,
    deserialize,
    dir_name,
    read_doc,
    serialize,
)
from flywheel.training.checkpoint_storage import Storage
from flywheel.training.train_state import TrainState

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
_HIDDEN_DIR = re.compile(r"^\.(?:tmp|old)-step-(\d+)-[0-9a-f]+$")


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
        self._st = Storage(root)
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
        step = check_state(state)
        doc, blobs = serialize(state, step)
        raw = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
        final = dir_name(step)
        tmp = f".tmp-{final}-{uuid.uuid4().hex[:12]}"
        order = [*FILES, STATE_FILE]  # state.json last: it is what makes a folder count
        try:
            self._st.makedirs(tmp)
            for name in FILES:
                self._st.write(blobs[name], tmp, name)
            self._st.write(raw, tmp, STATE_FILE)
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
        self._st.move_dir(final, old, [STATE_FILE, *(n for n in self._st.names(final) if n != STATE_FILE)])
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
        name = dir_name(step)
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
            self._st.remove_file(name, STATE_FILE)
            self._st.remove_dir(name)
            self._verified.pop(name, None)
            removed.append(self._st.uri(name))
        return removed

    # -- internals

    def _step_dirs(self) -> list[tuple[int, str]]:
        out = []
        for name in self._st.names():
            m = _STEP_DIR.match(name)
            if m and name == dir_name(int(m.group(1))):
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
            if not isinstance(step, int) or name != dir_name(step):
                raise ValueError("step and dir disagree")
        except (ValueError, KeyError, TypeError) as exc:
            return f"LATEST is unreadable ({exc})"
        return step, name

    def _complete(self, name: str) -> bool:
        try:
            raw = self._st.read(name, STATE_FILE)
            digest = hashlib.sha256(raw).hexdigest()
            if self._verified.get(name) == digest:
                return True
            doc = read_doc(name, raw)
            for file, meta in doc["files"].items():
                check_file(name, file, meta, *self._st.digest(name, file))
        except (FileNotFoundError, IntegrityError):
            # Only definite answers: a transient I/O error must propagate, or
            # prune() would delete a good checkpoint.
            return False
        self._verified[name] = digest
        return True

    def _load_dir(self, name: str) -> TrainState:
        raw = self._st.read(name, STATE_FILE)
        doc = read_doc(name, raw)
        tensors = {}
        for file, meta in doc["files"].items():
            data = self._st.read(name, file)
            check_file(name, file, meta, hashlib.sha256(data).hexdigest(), len(data))
            tensors[file] = _st_load(data)
        try:
            state = deserialize(doc, tensors)
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{name} does not decode: {exc!r}") from None
        self._verified[name] = hashlib.sha256(raw).hexdigest()
        return state
