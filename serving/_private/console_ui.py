"""The web console's files: ``GET /console[/...]`` on the ingress.

The pages are static files shipped in the wheel (``flywheel/serving/console/``,
no CDN: a console must work on a host with no network), read once and kept
in memory. They hold no data: every figure they show comes from the JSON
API (``/v2/registry``, ``/v2/endpoints``, ...) with the API key the browser
session holds, so the files themselves need no key.
"""

from __future__ import annotations

import threading
from importlib import resources

from flywheel.serving._private.http_errors import error_response
from flywheel.serving._private.http_server import Request, Response

_TYPES = {
    "html": b"text/html; charset=utf-8",
    "js": b"text/javascript; charset=utf-8",
    "css": b"text/css; charset=utf-8",
    "svg": b"image/svg+xml",
    "png": b"image/png",
    "json": b"application/json",
}
_INDEX = "index.html"


class ConsoleFiles:
    """The console's files by their path under ``/console/``."""

    def __init__(self, package: str = "flywheel.serving", folder: str = "console") -> None:
        self._package, self._folder = package, folder
        self._files: dict[str, tuple[bytes, bytes]] | None = None
        self._lock = threading.Lock()

    def _load(self) -> dict[str, tuple[bytes, bytes]]:
        with self._lock:
            if self._files is None:
                files = {}
                root = resources.files(self._package) / self._folder
                stack = [("", root)]
                while stack:
                    prefix, folder = stack.pop()
                    for item in folder.iterdir():
                        name = f"{prefix}{item.name}"
                        if item.is_dir():
                            stack.append((f"{name}/", item))
                            continue
                        ctype = _TYPES.get(item.name.rsplit(".", 1)[-1])
                        if ctype is not None:  # only what a browser asks for; never .py
                            files[name] = (item.read_bytes(), ctype)
                self._files = files
            return self._files

    def serve(self, req: Request, parts: list[str]) -> Response:
        """``parts``: the split path after ``/console``."""
        if req.method not in ("GET", "HEAD"):
            return error_response(405, f"method {req.method} not allowed on {req.path} (allowed: GET, HEAD)")
        name = "/".join(p for p in parts if p) or _INDEX
        found = self._load().get(name)
        if found is None:
            return error_response(404, f"no console file {name!r}")
        body, ctype = found
        return 200, body, ctype
