"""A job's ``code`` folder packed for its Ray Train workers.

Why a zip of our own: Ray uploads a local ``working_dir`` only for a whole
Ray job (``ray.init``); a Train run's ``worker_runtime_env`` must name a
package by URI. So the driver packs the folder into the job's own folder,
as ``code-<sha256 prefix>.zip``, and the workers get ``file://`` + that
path: every node unpacks it into its runtime-env cache and starts the
workers in it (on their import path). On a cluster of several nodes the
job's folder is on storage every node shares (``FLYWHEEL_HOME``, see
JobSpec.storage), so every node reads the same file.

The name carries a hash of the files: Ray caches an unpacked package by its
URI, so changed code (a resume after an edit) gets a new name, never a stale
copy. Byte-code caches and VCS folders are left out.
"""

from __future__ import annotations

import hashlib
import os
import zipfile

from flywheel.protocol.errors import ConfigError

MAX_BYTES = 100 * 1024 * 1024  # code, not data: a bigger folder is almost surely a mistake
_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache"}
# the folder inside the zip; Ray strips a single top-level folder on unpacking
_TOP = "code"


def _files(root: str) -> list[tuple[str, str]]:
    """(path relative to root with '/', absolute path), sorted."""
    found = []
    for here, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in names:
            if name.endswith((".pyc", ".pyo")):
                continue
            full = os.path.join(here, name)
            if os.path.isfile(full):
                found.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    return sorted(found)


def code_digest(root: str) -> str:
    """sha256 over the folder's file names and contents (what is shipped)."""
    h = hashlib.sha256()
    for rel, full in _files(root):
        h.update(rel.encode() + b"\0")
        with open(full, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def pack_code(code: str, dest: str) -> str:
    """Pack folder ``code`` into ``dest`` (unless an identical pack is
    there) and return its ``file://`` URI for a runtime env's working_dir.
    ConfigError naming ``code`` when it is not a folder or is too big."""
    root = os.path.abspath(code)
    if not os.path.isdir(root):
        raise ConfigError(f"code {code!r} is not a folder (it holds the job's Python modules)")
    files = _files(root)
    size = sum(os.path.getsize(full) for _, full in files)
    if size > MAX_BYTES:
        raise ConfigError(f"code {code!r} holds {size / 2**20:.0f} MiB; ship code only (at most "
                          f"{MAX_BYTES // 2**20} MiB), and read data through dataset:")
    path = os.path.join(os.path.abspath(dest), f"code-{code_digest(root)[:16]}.zip")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for rel, full in files:
                z.write(full, f"{_TOP}/{rel}")
        os.replace(tmp, path)  # never a half-written zip under the final name
    return f"file://{path}"
