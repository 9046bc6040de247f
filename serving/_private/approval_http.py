"""HTTP face of approvals: ``POST /v2/models/{name}/versions/{v}/approve``.

Body (optional): ``{"comment": "..."}``. Role ``admin`` (a continuous-training
loop holds an ``operate`` key and so can never approve its own candidate).
The approver is the identity the ingress authenticated, ``key:<API key
name>``, never a field of the request; with auth off there is no identity,
and the route answers 403 saying so. The router controller writes the
approval to the registry (one identity counts once: 409 for a second
approval by it) and answers the approvers and the gates that still fail.
"""

from __future__ import annotations

import msgspec

from flywheel.protocol.errors import FlywheelError
from flywheel.serving._private.endpoint_http import _call as call_controller
from flywheel.serving._private.http_errors import error_for_code, error_response, method_not_allowed
from flywheel.serving._private.http_server import Request, Response

ROLE = "admin"
_POST = ("POST",)


class _Approval(msgspec.Struct, forbid_unknown_fields=True):
    comment: str = ""


_APPROVAL = msgspec.json.Decoder(_Approval)


def is_approval(parts: list[str]) -> bool:
    """Whether a split path is ``v2/models/{name}/versions/{v}/approve``."""
    return len(parts) == 6 and parts[:2] == ["v2", "models"] and parts[3] == "versions" and parts[5] == "approve"


def approve_route(manage, req: Request, parts: list[str], auth, key_id: str | None):
    """Answer an approval (``parts``: the split path; ``auth``/``key_id``:
    the ingress's Authenticator and the caller's key, None when auth is off)."""
    if req.method not in _POST:
        return method_not_allowed(req.path, req.method, _POST)
    if auth is None or key_id is None:
        return error_response(403, "approvals need an authenticated identity: turn server.auth on and call with "
                                   "an API key that has the admin role (or approve with `flywheel models approve`)")
    name, version = parts[2], parts[4]
    if not version.isdigit():
        return error_response(400, f"version {version!r} must be a registry version number")
    try:
        body = _APPROVAL.decode(req.body) if req.body.strip() else _Approval()
    except msgspec.ValidationError as exc:
        return error_response(400, f"approve: {exc} (expected {{\"comment\": string}}, or no body)")
    except msgspec.DecodeError as exc:
        return error_response(400, f"approve: the body must be JSON: {exc}")
    if manage is None:
        return error_response(404, "approvals need the router controller, which this server does not run")
    return _approve(manage, auth, key_id, name, int(version), body.comment)


async def _approve(manage, auth, key_id: str, name: str, version: int, comment: str) -> Response:
    try:
        who = f"key:{await auth.key_name(key_id)}"
    except FlywheelError as exc:
        return error_for_code(exc.code, exc.message)
    # the management call's own error mapping (one table for both faces)
    return await call_controller(manage, "approve", name, {"version": version, "actor": who, "comment": comment}, 200)
