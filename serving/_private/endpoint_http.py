"""HTTP faces of endpoint routing: management (the router controller's) and feedback.

Management (role ``operate`` when auth is on), answered by the router
controller through any ingress replica:

    GET    /v2/endpoints                       every endpoint's status
    GET    /v2/endpoints/{name}                one endpoint's status
    PUT    /v2/endpoints/{name}/policy         {"kind": "fixed", "weights": {...}} | bandits
    POST   /v2/endpoints/{name}/variants       a model config: {"version", "ref" | "path", ...}
    DELETE /v2/endpoints/{name}/variants/{v}   drain and remove a variant
    POST   /v2/endpoints/{name}/swap           a model config; 202, progress in the status
    POST   /v2/endpoints/{name}/canary         {"variant", "steps", "hold_s", "gates", ...}
    DELETE /v2/endpoints/{name}/canary         abort the running canary
    POST   /v2/endpoints/{name}/promote        {"version": "2"}
    POST   /v2/endpoints/{name}/rollback
    PUT    /v2/endpoints/{name}/shadow         {"variant", "fraction"}
    DELETE /v2/endpoints/{name}/shadow

The add_variant, swap and canary bodies may carry ``"allow_signature_change":
true``: without it (or the endpoint's config saying so) a candidate whose
signature differs from the endpoint's is refused with a 400 naming the first
difference (serving/_private/signature_gate.py).

Feedback (role ``predict``): ``POST /v2/models/{name}/feedback`` with
``{"id": "<request id>", "reward": <number>}``, ``{"id", "label"}`` or
both. ``label`` (a number, or a list of numbers: one per row of a batched
request) is the ground truth of a captured request (the model's
``capture:``, serving/capture.py): it is written to the endpoint's label
files before the answer, which says ``"label_written": true``. A label
needs no routing state (any replica takes it, at any later time); the id
is the one the inference response carried in its body (``id``).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from flywheel.protocol.codec import encode_json
from flywheel.protocol.errors import ErrorCode, FlywheelError
from flywheel.serving._private.http_errors import error_for_code, error_response, method_not_allowed
from flywheel.serving._private.http_server import JSON, Request, Response
from flywheel.serving._private.endpoint_sync import SYNC_INTERVAL_S
from flywheel.serving._private.live_endpoint import check_label, check_reward
from flywheel.serving.capture import LabelWriter, endpoint_labels, label_rows

Manage = Callable[[str, "str | None", Any], Awaitable[dict]]

# (method, route shape) -> (operation, status on success); {v} takes the
# variant from the path
_ROUTES: dict[tuple[str, tuple[str, ...]], tuple[str, int]] = {
    ("GET", ()): ("status", 200),
    ("GET", ("{name}",)): ("status", 200),
    ("PUT", ("{name}", "policy")): ("set_policy", 200),
    ("POST", ("{name}", "variants")): ("add_variant", 202),
    ("DELETE", ("{name}", "variants", "{v}")): ("remove_variant", 202),
    ("POST", ("{name}", "swap")): ("swap", 202),
    ("POST", ("{name}", "canary")): ("start_canary", 200),
    ("DELETE", ("{name}", "canary")): ("abort_canary", 200),
    ("POST", ("{name}", "promote")): ("promote", 200),
    ("POST", ("{name}", "rollback")): ("rollback", 200),
    ("PUT", ("{name}", "shadow")): ("set_shadow", 200),
    ("DELETE", ("{name}", "shadow")): ("set_shadow", 200),
}
_NEEDS_BODY = frozenset(("set_policy", "add_variant", "swap", "start_canary", "promote"))


def _shape(parts: list[str]) -> tuple[str, ...]:
    shape = []
    for i, p in enumerate(parts):
        shape.append("{name}" if i == 0 else "{v}" if i == 2 and parts[1] == "variants" else p)
    return tuple(shape)


def endpoint_route(manage: Manage | None, req: Request, parts: list[str]):
    """Dispatch ``/v2/endpoints/...`` (``parts``: the path after it)."""
    parts = [p for p in parts if p] if parts == [""] else parts
    shape = _shape(parts)
    route = _ROUTES.get(("GET" if req.method == "HEAD" else req.method, shape))  # HEAD answered as GET
    if route is None:
        if any(shape == s for _, s in _ROUTES):
            allowed = sorted(m for m, s in _ROUTES if s == shape)
            if "GET" in allowed:  # HEAD is answered as GET
                allowed.append("HEAD")
            return method_not_allowed(req.path, req.method, tuple(allowed))
        return error_response(404, f"no route {req.method} {req.path}")
    if manage is None:
        return error_response(404, "endpoint management needs the router controller, which this server does not run")
    op, ok_status = route
    body: Any = None
    if op in _NEEDS_BODY or (op == "set_shadow" and req.method == "PUT"):
        try:
            body = msgspec.json.decode(req.body) if req.body else None
        except msgspec.DecodeError as exc:
            return error_response(400, f"the body must be JSON: {exc}")
        if not isinstance(body, dict):
            return error_response(400, "the body must be a JSON object")
    if op == "remove_variant":
        body = {"version": parts[2]}
    return _call(manage, op, parts[0] if parts else None, body, ok_status)


async def _call(manage: Manage, op: str, name: str | None, body: Any, ok_status: int) -> Response:
    try:
        answer = await manage(op, name, body)
    except FlywheelError as exc:
        return error_for_code(exc.code, exc.message)
    except Exception as exc:  # the controller is restarting or unreachable
        return error_for_code(int(ErrorCode.UNAVAILABLE), f"router controller unavailable: {exc}")
    if not answer.get("ok"):
        return error_for_code(answer.get("code", int(ErrorCode.INTERNAL)), answer.get("error", "failed"))
    return ok_status, encode_json(answer["result"]), JSON


class _Feedback(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    reward: float | None = None
    label: Any = None


_FEEDBACK = msgspec.json.Decoder(_Feedback)


def _bad(field: str, message: str) -> Response:
    return 400, encode_json({"error": message, "field": field}), JSON


def feedback(router, manage: Manage | None, name: str, body: bytes):
    """A reward and/or a label for an earlier request of endpoint ``name``.
    A reward is taken here when this replica routed the request, else by
    the controller (which knows the requests of every replica when there
    are several); a label is written to the endpoint's capture labels."""
    try:
        fb = _FEEDBACK.decode(body)
    except msgspec.ValidationError as exc:
        return error_response(
            400, f"feedback: {exc} (expected {{\"id\": string, \"reward\": number, \"label\": number or list}})"
        )
    except msgspec.DecodeError as exc:
        return error_response(400, f"feedback: the body must be JSON: {exc}")
    if fb.reward is None and fb.label is None:
        return _bad("reward", "feedback needs `reward` (a number), `label` (a number or a list of them) or both")
    try:
        label = check_label(fb.label) if fb.label is not None else None
    except FlywheelError as exc:
        return _bad("label", exc.message)
    try:
        reward = check_reward(fb.reward) if fb.reward is not None else None
        router.endpoint(name)  # an unknown name is a 404 before anything is kept
    except FlywheelError as exc:
        return error_for_code(exc.code, exc.message)
    if label is None:
        return _reward(router, manage, name, fb.id, reward)
    labels = endpoint_labels(router, name)
    if labels is None:
        return _bad("label", f"endpoint {name!r} captures nothing, so it takes no labels "
                             "(set capture: on its model or endpoint)")
    return _labelled(router, manage, name, fb.id, reward, label, labels)


def _reward(router, manage: Manage | None, name: str, rid: str, reward: float):
    try:
        variant = router.endpoint(name).take_feedback(rid, reward)
    except FlywheelError as exc:
        return error_for_code(exc.code, exc.message)
    if variant is not None:
        return 200, encode_json({"id": rid, "variant": variant, "accepted": True}), JSON
    if manage is None or not router.ship_ids:  # one replica: the id is nobody's
        return error_response(
            404, f"request id {rid!r} is unknown to endpoint {name!r} or has expired (ids are kept 600 s)"
        )
    return _feedback_elsewhere(manage, name, {"id": rid, "reward": reward})


async def _labelled(router, manage: Manage | None, name: str, rid: str, reward: float | None,
                    label, labels: LabelWriter) -> Response:
    """Take the reward (when given) as without a label, except that an id
    the router does not know (an endpoint with one variant keeps none) is
    said in the answer (``"accepted": false``); then write the label."""
    answer: dict[str, Any] = {"id": rid}
    if reward is not None:
        resp = _reward(router, manage, name, rid, reward)
        if inspect.isawaitable(resp):
            resp = await resp
        if resp[0] == 200:
            answer.update(msgspec.json.decode(resp[1]))
        elif resp[0] == 404:
            answer["accepted"] = False
        else:
            return resp
    try:
        await labels.write(label_rows(rid, label))
    except Exception as exc:  # noqa: BLE001 - storage down: the caller may retry
        return error_response(503, f"the label could not be written to {labels.root!r}: {exc}")
    answer["label_written"] = True
    return 200, encode_json(answer), JSON


async def _feedback_elsewhere(manage: Manage, name: str, body: dict) -> Response:
    """Another replica answered that request: the controller knows its id
    once that replica has reported it (within one report interval), so an
    id it does not know yet is asked for once more after that interval."""
    resp = await _call(manage, "feedback", name, body, 200)
    if resp[0] != 404:
        return resp
    await asyncio.sleep(SYNC_INTERVAL_S * 2)
    return await _call(manage, "feedback", name, body, 200)
