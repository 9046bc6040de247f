"""The few file operations a checkpoint store needs, on a local disk (fsync,
atomic renames) or through fsspec (``memory://``, ``s3://``, ...), where a
folder "rename" is a copy per object, so callers order the moves. Used by
training/checkpoint.py only; no Ray, no knowledge of what the files hold.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # bytes read at a time while hashing a file


class Storage:
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
