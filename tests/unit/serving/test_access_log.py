"""The sampled access log (serving/_private/access_log.py) around a handler."""

from __future__ import annotations

import asyncio
import json
import logging

from flywheel.common.log_format import JsonFormatter
from flywheel.serving._private.access_log import AccessLog, access_fields
from flywheel.serving._private.http_server import JSON, Request

KEY = "fwk_0123456789ab_" + "B" * 43
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def _req(**headers: str) -> Request:
    return Request("POST", "/v2/models/mlp/infer", {k.encode(): v.encode() for k, v in headers.items()},
                   b'{"inputs": [{"data": [42.4242]}]}', "api_key=" + KEY)


def test_fields_of_a_line():
    resp = (200, b'{"outputs": []}', JSON,
            b"flywheel-model-version: 3\r\nflywheel-request-id: r-9\r\ntraceparent: 00-" + TRACE.encode()
            + b"-00f067aa0ba902b7-01\r\n")
    f = access_fields(_req(authorization=f"Bearer {KEY}"), resp, 0.0015)
    assert f == {"method": "POST", "path": "/v2/models/mlp/infer", "model": "mlp", "version": "3", "status": 200,
                 "duration_ms": 1.5, "bytes_in": len(_req().body), "bytes_out": 15, "client": None,
                 "request_id": "r-9", "trace_id": TRACE}


def test_no_header_value_query_or_body_reaches_the_log(tmp_path):
    path = tmp_path / "access.jsonl"
    log = AccessLog(1.0, str(path))
    handle = log.wrap(lambda req: (401, b'{"error": "no"}', JSON, b"www-authenticate: Bearer\r\n"))
    assert handle(_req(authorization=f"Bearer {KEY}", cookie="secret-cookie"))[0] == 401
    log.close()
    raw = path.read_text()
    assert json.loads(raw)["status"] == 401
    for secret in (KEY, "secret-cookie", "42.4242", "api_key"):
        assert secret not in raw


def test_an_awaited_answer_is_logged_when_it_is_ready(tmp_path):
    path = tmp_path / "access.jsonl"
    log = AccessLog(1.0, str(path))

    async def answer():
        return 503, b"busy", JSON

    async def go():
        return await log.wrap(lambda req: answer())(_req())

    assert asyncio.run(go())[0] == 503
    log.close()
    assert json.loads(path.read_text())["status"] == 503


def test_unsampled_requests_are_not_logged(tmp_path):
    path = tmp_path / "access.jsonl"
    draws = iter([0.5, 0.005])
    log = AccessLog(0.01, str(path), rand=lambda: next(draws))
    handle = log.wrap(lambda req: (200, b"", JSON))
    handle(_req())
    handle(_req())
    log.close()
    assert len(path.read_text().splitlines()) == 1


def test_logger_lines_carry_the_fields_when_json(caplog):
    log = AccessLog(1.0)
    with caplog.at_level(logging.INFO, logger="flywheel.access"):
        log.wrap(lambda req: (404, b"{}", JSON))(_req(authorization=f"Bearer {KEY}"))
    (record,) = caplog.records
    line = JsonFormatter().format(record)
    assert json.loads(line)["status"] == 404
    assert KEY not in line


def test_a_grpc_answer_through_the_front_logs_its_grpc_status_and_trailers():
    req = Request("POST", "/inference.GRPCInferenceService/ModelInfer", {b"authorization": KEY.encode()}, b"\0" * 9)
    resp = (200, b"\0" * 12, b"application/grpc", b"",
            b"grpc-status: 0\r\nflywheel-model-version: 4\r\nflywheel-request-id: g-1\r\n")
    f = access_fields(req, resp, 0.001)
    assert (f["status"], f["grpc_status"], f["version"], f["request_id"], f["model"]) == (200, 0, "4", "g-1", None)
    assert KEY not in json.dumps(f)
