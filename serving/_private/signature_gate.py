"""The signature check before traffic moves: ``add_variant``, ``swap`` and a
canary's start compare the candidate's signature with the endpoint's and
refuse on the first difference (runtime/signature.py says what counts as
one), unless the change is allowed, by the request
(``allow_signature_change: true``) or by the endpoint's deploy config. An
allowed change is written to the endpoint's event history.

Signatures come from the models themselves: ingress replicas report the V2
metadata of every variant they loaded (serving/_private/endpoint_sync.py),
and the controller reads a candidate's from its artifact before anything
loads (serving/controller.py). A candidate whose signature cannot be read in
advance is judged again when its replicas report it loaded, before it is
marked ready, so that traffic never reaches it either way.

The endpoint's signature is that of the variant taking the largest share of
its traffic (the newest on a tie); a canary's is its baseline's.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec

from flywheel.protocol.errors import InvalidInputError
from flywheel.runtime.signature import Signature, SignatureMismatchError, signature_difference, signature_from_doc
from flywheel.serving._private.endpoint_state import Endpoint
from flywheel.serving.router import version_key

ALLOW_FIELD = "allow_signature_change"
log = logging.getLogger(__name__)


def take_allow(body: Any) -> tuple[Any, bool]:
    """``body`` without its ``allow_signature_change`` field, and the field's
    value (False when absent); InvalidInputError when it is not a boolean."""
    if not isinstance(body, dict) or ALLOW_FIELD not in body:
        return body, False
    allow = body[ALLOW_FIELD]
    if not isinstance(allow, bool):
        raise InvalidInputError(f"{ALLOW_FIELD} must be true or false, got {allow!r}")
    return {k: v for k, v in body.items() if k != ALLOW_FIELD}, allow


def record(ep: Endpoint, version: str, doc: Any) -> None:
    """Keep a variant's reported signature (V2 metadata); a malformed one is
    left out (the variant is then judged as unknown)."""
    try:
        sig = signature_from_doc(doc)
    except InvalidInputError:
        return
    ep.doc.setdefault("signatures", {})[version] = msgspec.json.decode(msgspec.json.encode(sig))  # as persisted
    ep.dirty = True


def forget(ep: Endpoint, version: str) -> None:
    """The variant is gone: a later variant of the same version may differ."""
    ep.doc.setdefault("signatures", {}).pop(version, None)


def known(ep: Endpoint, version: str) -> Signature | None:
    doc = ep.doc.get("signatures", {}).get(version)
    return None if doc is None else signature_from_doc(doc)


def reference(ep: Endpoint, exclude: str = "") -> str | None:
    """The variant whose signature is the endpoint's: the one taking the
    largest share of traffic now, the newest on a tie (None: no variant
    takes traffic)."""
    weights = ep.weights()
    if weights is None:
        weights = ep.policy().weights()
    shares = [(w, version_key(v), v) for v, w in weights.items() if w > 0 and v != exclude]
    return max(shares)[2] if shares else None


def unknown(ep: Endpoint, *versions: str | None) -> list[str]:
    """Which of ``versions`` have no signature known yet (None is skipped:
    no variant to compare with)."""
    return [v for v in versions if v is not None and known(ep, v) is None]


def judge(ep: Endpoint, version: str, candidate: Signature | None, *, against: str | None,
          allowed: bool) -> str | None:
    """Whether ``version`` (signature ``candidate``) may take traffic from
    ``against``: None when they agree (or either signature is unknown), the
    first difference when the change is allowed (the caller notes it, see
    :func:`note`). Raises SignatureMismatchError when it is not allowed."""
    ours = known(ep, against) if against is not None else None
    if candidate is None or ours is None:
        return None
    diff = signature_difference(
        ours, candidate, ours_label=f"the endpoint (version {against})", theirs_label=f"version {version}"
    )
    if diff is None or allowed or ep.doc.get(ALLOW_FIELD):
        return diff
    raise SignatureMismatchError(
        f"endpoint {ep.name!r}: {diff}; nothing was changed. To move traffic to it anyway, send "
        f"{ALLOW_FIELD}: true with the request (flywheel.client: allow_signature_change=True), or set "
        f"{ALLOW_FIELD} on the endpoint in the deploy config"
    )


def note(ep: Endpoint, version: str, diff: str, *, by_request: bool, now: float | None = None) -> None:
    """Write an allowed signature change to the endpoint's event history."""
    why = "the request's" if by_request else "the endpoint config's"
    detail = f"signature change allowed by {why} {ALLOW_FIELD}: {diff}"
    ep.event(time.time() if now is None else now, "signature", detail)
    log.warning("endpoint %s, version %s: %s", ep.name, version, detail)
