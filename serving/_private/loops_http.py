"""HTTP face of a deployment's continuous-training loops.

    GET  /v2/loops                    every loop: paused, current run, last outcome   (operate)
    GET  /v2/loops/{name}             one loop: its runs and recent events            (operate)
    GET  /v2/loops/{name}/runs        its runs, newest first (``?limit=N``)           (operate)
    POST /v2/loops/{name}/trigger     start a run now (``{"note": ...}`` optional)    (admin)
    POST /v2/loops/{name}/pause       stop its triggers                               (admin)
    POST /v2/loops/{name}/resume      let them fire again                             (admin)
    POST /v2/loops/{name}/cancel      end the run in progress                         (admin)

Reads come from the registry's database and changes are queued there
(loops/operate.py, the same code as ``flywheel loops``), so these answer
while the loop controller restarts. The controller's own metrics come from
its replica through a Serve handle, for ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import msgspec

from flywheel.protocol.codec import encode_json
from flywheel.protocol.errors import FlywheelError
from flywheel.serving._private.http_errors import error_for_code, error_response, method_not_allowed
from flywheel.serving._private.http_server import JSON, Request, Response

log = logging.getLogger(__name__)
_CHANGES = ("trigger", "pause", "resume", "cancel")


class _Note(msgspec.Struct, forbid_unknown_fields=True):
    note: str = ""


def required_role(method: str, parts: list[str]) -> str:
    """``parts``: the path after ``/v2/loops``. Reading needs operate,
    changing admin."""
    return "admin" if method not in ("GET", "HEAD") or (len(parts) == 2 and parts[1] in _CHANGES) else "operate"


class LoopsHttp:
    """``deployment``: the deployment's name (its loops' key in the store);
    ``app``: the Serve application holding the ``loops`` deployment."""

    def __init__(self, deployment: str, app: str, registry_uri: str, artifacts_uri: str) -> None:
        self._deployment = deployment
        self._app = app
        self._uri = registry_uri
        self._artifacts = artifacts_uri
        self._store = self._registry = None
        self._handle = None

    def _open(self):
        # opened on first use, in a worker thread (the store connects per thread)
        if self._store is None:
            from flywheel.registry import LoopStore, Registry

            self._store = LoopStore.open(self._uri)
            self._registry = Registry.open(self._uri, self._artifacts)
        return self._store, self._registry

    async def route(self, req: Request, parts: list[str], auth, key_id: str | None) -> Response:
        """``parts``: the path after ``/v2/loops``; ``auth`` / ``key_id``: the
        ingress's Authenticator and the caller's key (None: auth off), whose
        name the audit log records for a change (``key:<name>``)."""
        from flywheel.loops import operate

        actor = "http:unauthenticated"
        if auth is not None and key_id is not None:
            try:
                actor = f"key:{await auth.key_name(key_id)}"
            except FlywheelError as exc:
                return error_for_code(exc.code, exc.message)

        method = "GET" if req.method == "HEAD" else req.method
        parts = [p for p in parts if p]
        if len(parts) == 2 and parts[1] in _CHANGES:
            if method != "POST":
                return method_not_allowed(req.path, req.method, ("POST",))
            try:
                note = msgspec.json.decode(req.body, type=_Note).note if req.body.strip() else ""
            except msgspec.ValidationError as exc:
                return error_response(400, f"loops: {exc} (expected {{\"note\": string}})")
            except msgspec.DecodeError as exc:
                return error_response(400, f"loops: the body must be JSON: {exc}")
            call = lambda s, r: operate.request(s, r, self._deployment, parts[0], parts[1], actor=actor, note=note)  # noqa: E731
            status = 202
        elif len(parts) <= 2 and (len(parts) < 2 or parts[1] == "runs"):
            if method != "GET":
                return method_not_allowed(req.path, req.method, ("GET", "HEAD"))
            if not parts:
                call = lambda s, r: {"loops": operate.list_loops(s, self._deployment)}  # noqa: E731
            elif len(parts) == 1:
                call = lambda s, r: operate.show_loop(s, self._deployment, parts[0])  # noqa: E731
            else:
                from flywheel.serving._private.console_http import FieldError, bad, int_param, query

                try:
                    limit = int_param(query(req, ("limit",)), "limit", 100, 1, 10_000)
                except FieldError as exc:
                    return bad(exc.field, exc.message)
                call = lambda s, r: {"runs": operate.loop_runs(s, self._deployment, parts[0], limit=limit)}  # noqa: E731
            status = 200
        else:
            return error_response(404, f"no route {req.method} {req.path}")
        try:
            body = await asyncio.get_running_loop().run_in_executor(None, lambda: call(*self._open()))
        except FlywheelError as exc:
            return error_for_code(exc.code, exc.message)
        return status, encode_json(body), JSON

    async def metrics(self) -> bytes:
        """The controller's metrics (empty when it does not answer in 2 s)."""
        try:
            if self._handle is None:
                from ray import serve

                self._handle = serve.get_deployment_handle("loops", self._app)
            handle = self._handle
            return await asyncio.get_running_loop().run_in_executor(
                None, lambda: handle.metrics_text.remote().result(timeout_s=2))
        except Exception as exc:  # noqa: BLE001 - /metrics must answer without the controller
            log.debug("loop controller metrics unavailable: %s", exc)
            return b""

    def close(self) -> None:
        for part in (self._store, self._registry):
            if part is not None:
                part.close()

