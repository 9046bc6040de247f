"""Durations in configs: a number of seconds, or text such as ``"90s"``,
``"5m"``, ``"6h"``, ``"1d"``, ``"1h30m"``.

Config structs declare such a field as ``float | str`` and normalise it to
float seconds in ``__post_init__`` with :func:`seconds_field`, so code past
decoding only ever sees a float.
"""

from __future__ import annotations

import math
import re

import msgspec

from flywheel.protocol.errors import ConfigError

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")


def parse_duration(value: float | int | str, field: str) -> float:
    """Seconds in ``value`` (a number >= 0, a numeric string, or number-unit
    pairs with units s, m, h, d, w). ConfigError names ``field`` otherwise."""
    if isinstance(value, bool):
        raise ConfigError(f"{field}: expected a duration such as 30s, 5m, 6h, 1d or a number of seconds, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            if not _WHOLE.fullmatch(text):
                raise ConfigError(
                    f"{field}: expected a duration such as 30s, 5m, 6h, 1d or a number of seconds, got {value!r}"
                ) from None
            seconds = sum(float(n) * _UNITS[u] for n, u in _PART.findall(text))
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{field}: a duration must be a finite number of seconds >= 0, got {value!r}")
    return seconds


def seconds_field(struct: msgspec.Struct, field: str) -> float:
    """Parse ``struct.<field>`` as a duration and store it back as float
    seconds (frozen structs included); for use in ``__post_init__``."""
    seconds = parse_duration(getattr(struct, field), field)
    msgspec.structs.force_setattr(struct, field, seconds)
    return seconds


def format_duration(seconds: float) -> str:
    """A short human form: ``3600`` -> ``"1h"``, ``90`` -> ``"90s"``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
