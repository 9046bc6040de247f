"""Trigger kinds of a loop: one module each, found by name in a registry.

A loop spec lists its triggers as tagged mappings, decoded into
:data:`TriggerSpec` structs::

    triggers:
      - {kind: schedule, cron: "0 3 * * *"}
      - {kind: drift, k: 3, n: 5}
      - {kind: new_data, path: "s3://bucket/captured/*.parquet", settle_s: 10m}
      - {kind: performance, metric: accuracy, below: 0.9, window_s: 1h, min_samples: 50}

Each has ``check(signals, memory, now, *, endpoint) -> Firing | None`` (see
``base``). A manual start is not a configured trigger: the controller makes
its firing with :func:`manual_firing`.

A new kind is one module with a ``@register``-ed struct, imported below.
"""

from __future__ import annotations

import re
from typing import Any, Union

import msgspec

from flywheel.loops.triggers import drift, new_data, performance, schedule
from flywheel.loops.triggers.base import TRIGGER_KINDS, DriftWindow, FileInfo, Firing, Quality, Signals
from flywheel.loops.triggers.drift import DriftTrigger
from flywheel.loops.triggers.new_data import NewDataTrigger
from flywheel.loops.triggers.performance import PerformanceTrigger
from flywheel.loops.triggers.schedule import ScheduleTrigger
from flywheel.protocol.errors import ConfigError

__all__ = [
    "TRIGGER_KINDS",
    "DriftTrigger",
    "DriftWindow",
    "FileInfo",
    "Firing",
    "NewDataTrigger",
    "PerformanceTrigger",
    "Quality",
    "ScheduleTrigger",
    "Signals",
    "TriggerSpec",
    "manual_firing",
    "parse_triggers",
    "trigger_error_message",
]

# the modules register their kinds when imported; named here so none is dropped as unused
_KIND_MODULES = (drift, new_data, performance, schedule)

TriggerSpec = Union[tuple(TRIGGER_KINDS.values())]  # type: ignore[valid-type]
"""Any registered trigger kind; a msgspec field type (``list[TriggerSpec]``)."""

_AT = re.compile(r"^(?P<what>.*) - at `\$(?P<path>[^`]*)`$", re.S)
_BAD_KIND = re.compile(r"^Invalid value (?P<value>.*)$", re.S)
_FIELD_FIRST = re.compile(r"^(?P<field>[A-Za-z_][\w/]*): (?P<rest>.*)$", re.S)


def trigger_error_message(exc: msgspec.ValidationError, prefix: str = "") -> str:
    """The message of a failed trigger decode as ``<location>: <why>``, the
    location written like ``triggers[1].k`` (``prefix`` names the list when it
    was decoded on its own), naming the allowed kinds when ``kind`` was
    unknown, which msgspec's own message does not."""
    text = str(exc)
    match = _AT.match(text)
    if match is None:
        return f"{prefix}: {text}" if prefix else text
    what, location = match["what"], prefix + match["path"]
    location = location.lstrip(".")
    bad_kind = _BAD_KIND.match(what)
    if location.endswith(".kind") and bad_kind:
        kinds = ", ".join(sorted(TRIGGER_KINDS))
        return f"{location}: unknown trigger kind {bad_kind['value']}; allowed kinds: {kinds}"
    field_first = _FIELD_FIRST.match(what)
    if field_first:  # a __post_init__ message naming its field
        return f"{location}.{field_first['field']}: {field_first['rest']}"
    return f"{location}: {what}"


def parse_triggers(data: Any) -> list[TriggerSpec]:  # type: ignore[valid-type]
    """Decode a list of trigger mappings; ConfigError names the bad field
    (e.g. ``triggers[1].k``) and, for an unknown kind, the allowed ones."""
    try:
        return msgspec.convert(data, list[TriggerSpec])  # type: ignore[valid-type]
    except msgspec.ValidationError as exc:
        raise ConfigError(trigger_error_message(exc, prefix="triggers")) from None


def manual_firing(actor: str, note: str = "") -> Firing:
    """The firing of a manual start by ``actor`` (guard rails treat it as
    manual: see ``flywheel.loops.guards``)."""
    reason = f"manual: started by {actor}" + (f": {note}" if note else "")
    return Firing(kind="manual", reason=reason, detail={"actor": actor, "note": note})
