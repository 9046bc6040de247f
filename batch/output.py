"""The output folder: one Parquet file per partition, each written under a
temporary name and moved into place whole, and ``_flywheel/`` with the run's
manifest (what was asked) and report (how it ended).

A partition's file exists under its final name only once complete, so a
re-run after a crash takes every such file as done and scores the rest; the
manifest makes sure the re-run asks the same thing of the same input.
"""

from __future__ import annotations

import posixpath
import time
import uuid

import msgspec

from flywheel.batch.sources import is_local
from flywheel.protocol.errors import PreconditionFailedError

META = "_flywheel"


class Manifest(msgspec.Struct, frozen=True):
    """What a run in this folder was asked: a re-run resumes it only when it
    asks the same (same model bytes, same options, same input files)."""

    run_id: str
    model: str
    model_sha256: str
    options: dict
    partitions: dict[str, str]  # partition name -> input stamp
    created_at: float


class OutputFolder:
    def __init__(self, uri: str) -> None:
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(uri)
        self.root = self.root.rstrip("/")
        self.local = is_local(self.fs)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def part_path(self, name: str) -> str:
        return self.path(f"{name}.parquet")

    def done(self) -> set[str]:
        """Names of the partitions whose file is in place."""
        if not self.fs.exists(self.root):
            return set()
        return {posixpath.basename(p)[: -len(".parquet")] for p in self.fs.ls(self.root, detail=False)
                if p.endswith(".parquet")}

    def read_manifest(self) -> Manifest | None:
        p = self.path(META, "manifest.json")
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "rb") as f:
            return msgspec.json.decode(f.read(), type=Manifest)

    def begin(self, manifest: Manifest, overwrite: bool) -> tuple[Manifest, set[str]]:
        """Start or resume the run; returns the manifest in force and the
        partitions already done. Refuses a folder holding another run."""
        old = self.read_manifest()
        if old is not None and overwrite:
            self.clear()
            old = None
        if old is None:
            if self.fs.exists(self.root) and self.done():
                raise PreconditionFailedError(
                    f"output {self.root} holds Parquet files but no Flywheel run; choose an empty folder"
                )
            self.fs.makedirs(self.path(META, "tmp"), exist_ok=True)
            self.write_json("manifest.json", manifest)
            return manifest, set()
        done = self.done() & set(old.partitions)
        why = _differs(old, manifest, done)
        if why:
            raise PreconditionFailedError(
                f"output {self.root} holds run {old.run_id}, which {why}; resume it with the same job, "
                "or pass overwrite (--overwrite) to start again"
            )
        self.fs.makedirs(self.path(META, "tmp"), exist_ok=True)
        if old.partitions != manifest.partitions:  # a failed partition's file was mended: score the new one
            old = msgspec.structs.replace(old, partitions=manifest.partitions)
            self.write_json("manifest.json", old)
        return old, done

    def clear(self) -> None:
        for p in self.fs.ls(self.root, detail=False):
            if p.endswith(".parquet"):
                self.fs.rm(p)
        if self.fs.exists(self.path(META)):
            self.fs.rm(self.path(META), recursive=True)

    def write_json(self, name: str, value) -> None:
        data = msgspec.json.encode(value)
        tmp = self.path(META, "tmp", f"{name}.{uuid.uuid4().hex}")
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, self.path(META, name))

    def temp_path(self, name: str) -> str:
        return self.path(META, "tmp", f"{name}.{uuid.uuid4().hex}.parquet")

    def commit(self, tmp: str, name: str) -> None:
        """Move a finished partition's file into place: a rename on a local
        disk, a single object write on object storage."""
        if self.local:
            import os

            # on disk before it is named done: a machine crash must not leave
            # a truncated file that a resumed run would take as finished
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.part_path(name))
        else:
            self.fs.mv(tmp, self.part_path(name))

    def sweep(self) -> None:
        """Drop temporary files that a killed run left behind."""
        tmp = self.path(META, "tmp")
        if self.fs.exists(tmp):
            for p in self.fs.ls(tmp, detail=False):
                self.fs.rm(p)


def _differs(old: Manifest, new: Manifest, done: set[str]) -> str:
    """Why ``new`` is not a resumption of ``old`` ("" when it is). Input
    files may change only under partitions not yet written (a mended file)."""
    if old.model_sha256 != new.model_sha256:
        return f"scored with model {old.model} (sha256 {old.model_sha256[:12]}...), not {new.model}"
    for key in sorted(set(old.options) | set(new.options)):
        if old.options.get(key) != new.options.get(key):
            return f"was asked {key}={old.options.get(key)!r}, not {new.options.get(key)!r}"
    if set(old.partitions) != set(new.partitions):
        return "read another set of input files"
    changed = sorted(n for n, s in new.partitions.items() if old.partitions[n] != s and n in done)
    if changed:
        return f"wrote partitions whose input has changed since ({changed[0]} ...)"
    return ""


def new_run_id() -> str:
    return time.strftime("r%Y%m%d-%H%M%S-", time.gmtime()) + uuid.uuid4().hex[:8]
