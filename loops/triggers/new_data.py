"""``{kind: new_data, path: "s3://bucket/captured/*.parquet", settle_s: 0}``:
fire when the listing of ``path`` changes.

The listing's fingerprint is a sha256 over its sorted (path, size, modified)
triples. The first check records it without firing (an empty listing is a
fingerprint too). A later check that sees a different fingerprint fires;
with ``settle_s > 0`` only once the new listing has stayed the same for
``settle_s`` seconds (a writer still adding files keeps it waiting), and a
listing that goes back to the recorded one cancels the wait.

memory: ``{"fingerprint": str, "files": {path: [size, modified]} | absent,
"pending": str, "pending_since": float}``. The per-file listing is kept only
up to :data:`MAX_REMEMBERED_FILES` files; past that the firing's detail gives
the file counts but not what was added, changed or removed.
"""

from __future__ import annotations

import hashlib

import msgspec

from flywheel.loops.triggers.base import FileInfo, Firing, Signals, register, require
from flywheel.loops.triggers.durations import format_duration, seconds_field

MAX_REMEMBERED_FILES = 5000


def fingerprint(files: list[FileInfo]) -> str:
    """sha256 (hex) over the sorted (path, size, modified) triples."""
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: (f.path, f.size, f.modified)):
        digest.update(msgspec.json.encode([f.path, f.size, f.modified]))
        digest.update(b"\n")
    return digest.hexdigest()


def _listing(files: list[FileInfo]) -> dict[str, list] | None:
    if len(files) > MAX_REMEMBERED_FILES:
        return None
    return {f.path: [f.size, f.modified] for f in files}


def _changes(before: dict[str, list] | None, after: dict[str, list] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    return {
        "added": sum(1 for p in after if p not in before),
        "changed": sum(1 for p, v in after.items() if p in before and list(before[p]) != list(v)),
        "removed": sum(1 for p in before if p not in after),
    }


@register
class NewDataTrigger(msgspec.Struct, tag="new_data", tag_field="kind", frozen=True, forbid_unknown_fields=True):
    """Fire when the files at ``path`` (a local path, glob or fsspec URI)
    change, once they have been quiet for ``settle_s`` (a duration)."""

    path: str
    settle_s: float | str = 0.0

    def __post_init__(self) -> None:
        require(bool(self.path.strip()), "path", "a local path, glob or fsspec URI", self.path)
        seconds_field(self, "settle_s")

    def check(self, signals: Signals, memory: dict, now: float, *, endpoint: str) -> Firing | None:
        files = signals.list_files(self.path)
        fp = fingerprint(files)
        if "fingerprint" not in memory:
            memory.update(fingerprint=fp, files=_listing(files), count=len(files))
            return None
        if fp == memory["fingerprint"]:
            memory.pop("pending", None)
            memory.pop("pending_since", None)
            return None
        settle = float(self.settle_s)
        if settle > 0:
            if memory.get("pending") != fp:
                memory.update(pending=fp, pending_since=now)
                return None
            if now - memory["pending_since"] < settle:
                return None
        listing = _listing(files)
        changes = _changes(memory.get("files"), listing)
        before = memory.get("count", 0)
        memory.clear()
        memory.update(fingerprint=fp, files=listing, count=len(files))
        if changes is None:
            what = f"{before} -> {len(files)} files"
            detail: dict = {"files": len(files), "files_before": before}
        else:
            what = f"{changes['added']} added, {changes['changed']} changed, {changes['removed']} removed"
            what += f" ({len(files)} files)"
            detail = {"files": len(files), "files_before": before, **changes}
        quiet = f", unchanged for {format_duration(settle)}" if settle > 0 else ""
        return Firing(
            kind="new_data",
            reason=f"new data at {self.path}: {what}{quiet}",
            detail={**detail, "fingerprint": fp},
        )
