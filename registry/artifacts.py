"""Content-addressed artifact storage on any fsspec filesystem.

Blobs live at ``<root>/sha256/<ab>/<digest>``: a blob is written to a
temporary name and renamed into place once complete, so a crash never leaves
a half-written file under a name the registry points to, and identical
artifacts are stored once. Every read re-hashes and compares with the digest
recorded at registration.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from flywheel.protocol.errors import ConfigError, IntegrityError, NotFoundError

_CHUNK = 1 << 20


class ArtifactStore:
    """``root`` is a local folder or an fsspec URI (``memory://x``, ``s3://b/p``)."""

    def __init__(self, root: str) -> None:
        import fsspec

        if "://" not in root:
            root = os.path.abspath(root)
        self._fs, self._root = fsspec.core.url_to_fs(root)
        self._protocol = root.split("://", 1)[0] if "://" in root else "file"
        self._fs.makedirs(self._root, exist_ok=True)
        self.root = root

    def _blob(self, digest: str) -> str:
        return f"{self._root}/sha256/{digest[:2]}/{digest}"

    def uri(self, path: str) -> str:
        return path if self._protocol == "file" else f"{self._protocol}://{path}"

    def put(self, source: str | Path | bytes) -> tuple[str, str, int]:
        """Store a file's (or bytes') content; returns (uri, sha256, size)."""
        tmp = f"{self._root}/tmp/{uuid.uuid4().hex}"
        self._fs.makedirs(f"{self._root}/tmp", exist_ok=True)
        h, size = hashlib.sha256(), 0
        with self._fs.open(tmp, "wb") as out:
            if isinstance(source, bytes):
                h.update(source)
                out.write(source)
                size = len(source)
            else:
                if not os.path.isfile(source):
                    raise ConfigError(f"artifact source {str(source)!r} is not a file")
                with open(source, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
        digest = h.hexdigest()
        final = self._blob(digest)
        self._fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        if self._fs.exists(final):
            self._fs.rm(tmp)
        else:
            self._fs.mv(tmp, final)
        return self.uri(final), digest, size

    def _strip(self, uri: str) -> str:
        return uri.split("://", 1)[1] if "://" in uri else uri

    def read_verified(self, uri: str, sha256: str, label: str) -> bytes:
        """The blob's bytes after checking them against ``sha256``."""
        path = self._strip(uri)
        if not self._fs.exists(path):
            raise NotFoundError(f"artifact {label} is missing from the store ({uri})")
        with self._fs.open(path, "rb") as f:
            data = f.read()
        self._check(hashlib.sha256(data).hexdigest(), sha256, label)
        return data

    def local_verified(self, uri: str, sha256: str, label: str, cache_dir: str) -> str:
        """A local file path holding the verified blob: the blob itself on a
        local store (hashed on every call), else a verified copy in ``cache_dir``."""
        if self._protocol == "file":
            path = self._strip(uri)
            if not os.path.isfile(path):
                raise NotFoundError(f"artifact {label} is missing from the store ({uri})")
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
            self._check(h.hexdigest(), sha256, label)
            return path
        data = self.read_verified(uri, sha256, label)
        os.makedirs(cache_dir, exist_ok=True)
        local = os.path.join(cache_dir, sha256)
        tmp = f"{local}.{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, local)
        return local

    @staticmethod
    def _check(got: str, want: str, label: str) -> None:
        if got != want:
            raise IntegrityError(
                f"artifact {label} failed its integrity check: sha256 {got[:16]}... does not match "
                f"the {want[:16]}... recorded at registration; refusing to load it"
            )
