"""JSON log records (common/log_format.py) and FLYWHEEL_LOG_FORMAT."""

from __future__ import annotations

import io
import json
import logging

import pytest

from flywheel.common.log_format import JsonFormatter, redact, use_json_logs
from flywheel.common.settings import load_settings

KEY = "fwk_0123456789ab_" + "A" * 43


def _logger(name: str) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    logger = logging.getLogger(name)
    logger.handlers[:] = []
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    use_json_logs(logger, out)
    return logger, out


def test_a_record_is_one_json_object_per_line():
    logger, out = _logger("flywheel.test.json1")
    logger.warning("model %s loaded", "mlp", extra={"request_id": "r1", "trace_id": "ab" * 16})
    logger.info("second")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert (first["level"], first["logger"], first["message"]) == ("WARNING", "flywheel.test.json1", "model mlp loaded")
    assert (first["request_id"], first["trace_id"]) == ("r1", "ab" * 16)
    assert first["ts"].endswith("Z")


def test_a_key_or_credential_in_a_message_is_masked():
    logger, out = _logger("flywheel.test.json2")
    logger.error("refused %s and Authorization: Bearer abc.def-123", KEY)
    line = out.getvalue()
    assert KEY not in line
    assert "abc.def-123" not in line
    assert "Bearer ***" in json.loads(line)["message"]


def test_a_traceback_is_a_field_and_masked():
    logger, out = _logger("flywheel.test.json3")
    try:
        raise ValueError(f"bad token {KEY}")
    except ValueError:
        logger.exception("failed")
    rec = json.loads(out.getvalue())
    assert "ValueError" in rec["exc"]
    assert KEY not in out.getvalue()


def test_access_fields_become_top_level_fields():
    rec = logging.LogRecord("flywheel.access", logging.INFO, __file__, 1, "x", None, None)
    rec.access = {"status": 200, "path": "/v2/models/m/infer"}
    assert json.loads(JsonFormatter().format(rec))["status"] == 200


def test_redact_leaves_ordinary_text_alone():
    assert redact("input 'x' has 3 rows") == "input 'x' has 3 rows"


def test_log_format_setting():
    assert load_settings({}).log_format == "text"
    assert load_settings({"FLYWHEEL_LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(ValueError, match="FLYWHEEL_LOG_FORMAT"):
        load_settings({"FLYWHEEL_LOG_FORMAT": "xml"})
