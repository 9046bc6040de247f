"""Log records as one JSON object per line (``FLYWHEEL_LOG_FORMAT=json``).

An object holds ``ts`` (UTC, ISO 8601 with milliseconds), ``level``,
``logger`` and ``message``, then ``request_id`` / ``trace_id`` when the
record carries them (``extra={"request_id": ...}``), the fields of an access
log line (``extra={"access": {...}}``, serving/_private/access_log.py), and
``exc`` with the traceback of a record logged with exc_info.

Secrets. Flywheel logs no key and no tensor data by design; as a second
line of defence the formatter masks what looks like a credential in any
text it writes (a Flywheel API key ``fwk_<id>_<secret>``, the value after
``Bearer`` / ``Basic``), so that a message that quoted one by mistake does
not put it in a log file.

Nothing happens on import: :func:`use_json_logs` changes the handlers of a
logger when called (``flywheel serve`` and each ingress replica call it
when the setting says json).
"""

from __future__ import annotations

import logging
import re
import sys
import time

import msgspec

# a Flywheel API key (registry/keys.py) and HTTP credentials
_SECRET = re.compile(r"fwk_[0-9a-f]{12}_[A-Za-z0-9_-]+|(?i:\b(bearer|basic)\s+)[A-Za-z0-9._~+/=-]+")
LOG_FORMATS = ("text", "json")


def redact(text: str) -> str:
    """``text`` with API keys and credentials masked as ``***``."""
    if "fwk_" not in text and "earer" not in text and "asic" not in text:
        return text  # the common case: nothing to search
    return _SECRET.sub(lambda m: (m.group(1) + " ***") if m.group(1) else "***", text)


_ENCODE = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        obj: dict[str, object] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key in ("request_id", "trace_id"):
            value = record.__dict__.get(key)
            if value:
                obj[key] = str(value)
        access = record.__dict__.get("access")
        if isinstance(access, dict):
            for key, value in access.items():
                obj.setdefault(key, value)
        if record.exc_info:
            obj["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            obj["exc"] = redact(record.exc_text)
        return _ENCODE.encode(obj).decode()


def use_json_logs(logger: logging.Logger | None = None, stream=None) -> None:
    """Format every handler of ``logger`` (the root logger by default) with
    :class:`JsonFormatter`; with no handler yet, add one on ``stream``
    (stderr by default). Safe to call twice."""
    target = logging.getLogger() if logger is None else logger
    if not target.handlers:
        target.addHandler(logging.StreamHandler(sys.stderr if stream is None else stream))
    for handler in target.handlers:
        handler.setFormatter(JsonFormatter())
