"""``allow_signature_change=True`` on the moves that check signatures puts
``"allow_signature_change": true`` in the body, for Client and AsyncClient;
left out, the body is the caller's, unchanged."""

from __future__ import annotations

import asyncio
import json

import pytest

from flywheel.client import AsyncClient, Client
from flywheel.client._v2 import HttpReply

MOVES = [("add_variant", "variants", {"version": "2", "path": "m.onnx"}),
         ("swap", "swap", {"version": "2", "path": "m.onnx"}),
         ("start_canary", "canary", {"variant": "2"})]


def _bodies(method: str, body: dict, **kwargs) -> list[tuple[str, dict]]:
    seen = []

    def record(call):
        seen.append((call.path, json.loads(call.body)))
        return HttpReply(200, {}, b"{}")

    async def arecord(call):
        return record(call)

    c, ac = Client("http://h:1"), AsyncClient("http://h:1")
    c._send, ac._send = record, arecord
    getattr(c, method)("m", body, **kwargs)
    asyncio.run(getattr(ac, method)("m", body, **kwargs))
    return seen


@pytest.mark.parametrize("method,route,body", MOVES, ids=[m[0] for m in MOVES])
def test_allow_signature_change_goes_in_the_body(method, route, body):
    sent = _bodies(method, body, allow_signature_change=True)
    assert sent == [(f"/v2/endpoints/m/{route}", {**body, "allow_signature_change": True})] * 2
    assert "allow_signature_change" not in body  # the caller's mapping is not changed


@pytest.mark.parametrize("method,route,body", MOVES, ids=[m[0] for m in MOVES])
def test_without_it_the_body_is_the_callers(method, route, body):
    assert _bodies(method, body) == [(f"/v2/endpoints/m/{route}", body)] * 2
