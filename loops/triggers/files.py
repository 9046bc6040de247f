"""List files through fsspec: a local path, a glob, ``file://`` or any
protocol whose fsspec implementation is installed (``s3://`` with s3fs).

Shared by the ``new_data`` trigger's tests and the controller's Signals.
"""

from __future__ import annotations

import fsspec

from flywheel.loops.triggers.base import FileInfo
from flywheel.protocol.errors import ConfigError

_GLOB_CHARS = set("*?[")
# what fsspec implementations call a file's version, best first
_MODIFIED_KEYS = ("mtime", "LastModified", "last_modified", "updated", "ETag", "etag", "md5", "created")


def _modified(info: dict) -> str:
    for key in _MODIFIED_KEYS:
        value = info.get(key)
        if value is not None:
            return str(value)
    return ""


def list_files(pattern: str) -> list[FileInfo]:
    """The files (not folders) matching ``pattern``, sorted by path.

    A glob matches as fsspec's ``glob`` does (``**`` crosses folders); a
    folder lists every file below it; a file lists itself; a path that does
    not exist lists nothing (a folder not yet written to is an empty dataset).
    Paths keep ``pattern``'s protocol, except local ones, which stay plain.
    An unknown protocol, or one whose package is not installed, raises
    ConfigError with fsspec's install hint; errors of the filesystem itself
    (permissions, network) propagate as they are (OSError, mostly).
    """
    try:
        fs, path = fsspec.core.url_to_fs(pattern)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"path: cannot list {pattern!r}: {exc}") from None
    if _GLOB_CHARS & set(path):
        found = fs.glob(path, detail=True)
    elif fs.isdir(path):
        found = fs.find(path, detail=True)
    elif fs.exists(path):
        found = {path: fs.info(path)}
    else:
        found = {}
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    files = []
    for name, info in found.items():
        if info.get("type") == "directory":
            continue
        shown = name if local else fs.unstrip_protocol(name)
        files.append(FileInfo(path=shown, size=int(info.get("size") or 0), modified=_modified(info)))
    files.sort(key=lambda f: f.path)
    return files
