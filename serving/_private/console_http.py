"""The console's JSON API: one face over the registry's database.

    /v2/registry/...   models, versions, lineage; approve, promote, alias, rollback
                       (serving/_private/registry_http.py)
    /v2/audit          the audit log, newest first, filtered
    /v2/jobs/...       training jobs; cancel one (serving/_private/jobs_http.py)

Reading needs ``operate``; an action (any method but GET/HEAD, or a path
ending in an action's name) needs ``admin`` (``required_role``). Actions
call the very functions ``flywheel models`` / ``flywheel train`` call
(``Registry.approve``, ``promote``, ``set_alias``, ``rollback``, a job
handle's ``cancel``), so the gates and audit entries are theirs; the actor
recorded is the caller's API key, ``key:<name>``, never a field of the
request (``http:unauthenticated`` with auth off; approvals then refuse).

The stores are opened on first use, in worker threads (the database's
connections are per thread), so that a console poll never blocks the
ingress's loop and a server without a console never opens them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import threading
from urllib.parse import parse_qsl

import msgspec

from flywheel.protocol.codec import encode_json
from flywheel.protocol.errors import FlywheelError, InvalidInputError
from flywheel.serving._private.http_errors import error_for_code, error_response, method_not_allowed
from flywheel.serving._private.http_server import JSON, Request, Response

PREFIXES = ("registry", "audit", "jobs")  # /v2/<prefix>/...
UNAUTHENTICATED = "http:unauthenticated"


class FieldError(InvalidInputError):
    """A bad query parameter, path segment or body field: answered 400 with
    the field's name beside the message."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def required_role(method: str, parts: list[str]) -> str:
    """``parts``: the split path after ``/v2``. Reading needs operate; an
    action's path needs admin whatever the method (so a wrong method on it
    is not answered to an operate key)."""
    if method not in ("GET", "HEAD") or is_action(parts):
        return "admin"
    return "operate"


def is_action(parts: list[str]) -> bool:
    """Whether a split path (after ``/v2``) is an action's, by its shape
    (so that a model named ``cancel`` is still read with operate)."""
    if parts[:2] == ["registry", "models"]:
        return (len(parts) == 6 and parts[3] == "versions" and parts[5] in ("approve", "promote", "alias")) or \
            (len(parts) == 4 and parts[3] == "rollback")
    return parts[:1] == ["jobs"] and len(parts) == 3 and parts[2] == "cancel"


def model_for(parts: list[str]) -> str | None:
    """The model ``/v2/registry/models/{name}/...`` addresses, for a key's
    scopes; None for the server-wide routes (lists, audit, jobs)."""
    if len(parts) >= 3 and parts[:2] == ["registry", "models"] and parts[2]:
        return parts[2]
    return None


def bad(field: str, message: str) -> Response:
    return 400, encode_json({"error": message, "field": field}), JSON


def query(req: Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query parameters, each at most once and each one of ``allowed``
    (FieldError naming the first that is not)."""
    out: dict[str, str] = {}
    for key, value in parse_qsl(req.query, keep_blank_values=True):
        if key not in allowed:
            raise FieldError(key, f"unknown query parameter {key!r}: this route takes "
                                  f"{', '.join(allowed) if allowed else 'none'}")
        if key in out:
            raise FieldError(key, f"query parameter {key!r} is given more than once")
        out[key] = value
    return out


def int_param(params: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    if not raw.strip().isdigit() or not low <= int(raw) <= high:
        raise FieldError(name, f"{name} must be an integer from {low} to {high}, got {raw!r}")
    return int(raw)


def time_param(params: dict[str, str], name: str) -> float | None:
    """Epoch seconds or an ISO 8601 date/time (UTC unless it says), as the
    CLI's ``--since``/``--until`` take."""
    raw = params.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            t = dt.datetime.fromisoformat(raw)
        except ValueError:
            raise FieldError(name, f"{name} must be epoch seconds or an ISO 8601 date/time, got {raw!r}") from None
        value = (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()
    if not math.isfinite(value):
        raise FieldError(name, f"{name} must be a finite time, got {raw!r}")
    return value


def text_param(params: dict[str, str], name: str) -> str | None:
    raw = params.get(name)
    if raw is not None and not raw:
        raise FieldError(name, f"{name} must not be empty (leave it out to match any)")
    return raw


def version_segment(raw: str) -> int:
    if not raw.isdigit() or len(raw) > 18:
        raise FieldError("version", f"version {raw!r} must be a registry version number")
    return int(raw)


def decode_body(req: Request, kind: type, expected: str):
    """The body as ``kind`` (an empty body: its defaults); FieldError naming
    the bad field and what was expected."""
    body = req.body if req.body.strip() else b"{}"
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        path = str(exc).rpartition("at `$.")[2].rstrip("`") if "at `$." in str(exc) else "body"
        raise FieldError(path, f"{exc} (expected {expected})") from None
    except msgspec.DecodeError as exc:
        raise FieldError("body", f"the body must be JSON ({expected}): {exc}") from None


class ConsoleHttp:
    """``registry_uri`` / ``artifacts_uri``: the deployment's registry
    (its database also holds the training jobs)."""

    def __init__(self, registry_uri: str, artifacts_uri: str) -> None:
        self.registry_uri = registry_uri
        self.artifacts_uri = artifacts_uri
        self._registry = self._training = None
        self._opening = threading.Lock()  # two first requests at once open each store once

    # -- the stores, opened on first use in a worker thread ----------------------
    def registry(self):
        with self._opening:
            if self._registry is None:
                from flywheel.registry import Registry

                self._registry = Registry.open(self.registry_uri, self.artifacts_uri)
            return self._registry

    def training(self):
        with self._opening:
            if self._training is None:
                from flywheel.common.settings import load_settings
                from flywheel.training.api import TrainingRuntime

                # the deployment's registry, whatever this process's settings
                # say; no scheduler is started: this runtime reads and cancels
                settings = msgspec.structs.replace(load_settings(), registry_uri=self.registry_uri)
                self._training = TrainingRuntime(settings)
            return self._training

    async def route(self, req: Request, parts: list[str], auth, key_id: str | None) -> Response:
        """``parts``: the split path after ``/v2``; ``auth``/``key_id``: the
        ingress's Authenticator and the caller's key (None: auth off)."""
        from flywheel.serving._private import jobs_http, registry_http

        method = "GET" if req.method == "HEAD" else req.method
        try:
            if parts[0] == "jobs":
                plan = jobs_http.plan(method, req, parts[1:])
            elif parts[0] == "audit":
                plan = registry_http.plan_audit(method, req, parts[1:])
            else:
                plan = registry_http.plan(method, req, parts[1:])
            if isinstance(plan, tuple) and type(plan[0]) is int:
                return plan  # a 404 or 405 decided by the path alone
            call, status, acts = plan
            actor = await _actor(auth, key_id) if acts else UNAUTHENTICATED
            if acts == "identity" and actor == UNAUTHENTICATED:
                return error_response(403, "approvals need an authenticated identity: turn server.auth on and "
                                           "call with an API key that has the admin role (or approve with "
                                           "`flywheel models approve`)")
            body = await asyncio.get_running_loop().run_in_executor(None, lambda: call(self, actor))
        except FieldError as exc:
            return bad(exc.field, exc.message)
        except FlywheelError as exc:
            return error_for_code(exc.code, exc.message)
        return status, encode_json(body), JSON

    def close(self) -> None:
        if self._registry is not None:
            self._registry.close()
        if self._training is not None:
            self._training.store.close()


async def _actor(auth, key_id: str | None) -> str:
    """Who acts: ``key:<name>`` of the caller's key; UNAUTHENTICATED with auth off."""
    if auth is None or key_id is None:
        return UNAUTHENTICATED
    return f"key:{await auth.key_name(key_id)}"


def no_route(req: Request) -> Response:
    return error_response(404, f"no route {req.method} {req.path}")


def only(req: Request, method: str, allowed: tuple[str, ...]) -> Response | None:
    if method not in allowed:
        return method_not_allowed(req.path, req.method, (*allowed, "HEAD") if "GET" in allowed else allowed)
    return None
