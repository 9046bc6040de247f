"""What every trigger kind shares: the signals it reads, what it returns
when it fires, and the registry of kinds.

A trigger kind is a frozen ``msgspec.Struct`` tagged on ``kind`` (one module
each, registered with :func:`register`) with a method::

    def check(self, signals: Signals, memory: dict, now: float, *, endpoint: str) -> Firing | None

``check`` is pure given its inputs: time comes in as ``now`` (Unix seconds),
the outside world through ``signals``, and ``memory`` is the trigger's own
JSON-able state, which the controller persists between calls (it must survive
``msgspec.json.decode(msgspec.json.encode(memory))`` and a restart). ``check``
mutates ``memory`` in place, and does so as though a firing were acted upon:
a controller that wants a firing its guard rails suppressed to be offered
again passes a copy and keeps the old memory. Errors raised by ``signals``
propagate, and leave ``memory`` as it was.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Protocol

import msgspec

from flywheel.protocol.errors import ConfigError


class DriftWindow(msgspec.Struct, frozen=True):
    """One scored drift window of the endpoint's production variant
    (``drifted`` when any of its tests drifted)."""

    ts: float
    drifted: bool


class Quality(msgspec.Struct, frozen=True):
    """Feedback over a time window: how many rewards and their mean, how many
    labelled predictions and their accuracy (None when there are none)."""

    rewards: int
    mean_reward: float | None
    labelled: int
    accuracy: float | None


class FileInfo(msgspec.Struct, frozen=True):
    """One file of a listing; ``modified`` is an mtime or an etag, as text."""

    path: str
    size: int
    modified: str


class Signals(Protocol):
    """What triggers read about the world; the controller supplies it."""

    def drift_windows(self, endpoint: str) -> list[DriftWindow]:
        """Recent scored drift windows of the endpoint's production variant, oldest first."""
        ...

    def quality(self, endpoint: str, window_s: float) -> Quality:
        """Feedback on the endpoint over the last ``window_s`` seconds."""
        ...

    def list_files(self, pattern: str) -> list[FileInfo]:
        """The files matching a local path, glob or fsspec URI (see ``files.list_files``)."""
        ...


class Firing(msgspec.Struct, frozen=True):
    """A trigger fired: its kind, one human line saying why, and numbers."""

    kind: str
    reason: str
    detail: dict[str, Any] = {}


TRIGGER_KINDS: dict[str, type] = {}
"""Every registered trigger kind, by its tag."""


def register(cls: type) -> type:
    """Class decorator: add a trigger kind struct to :data:`TRIGGER_KINDS`
    under its tag. TypeError at import when it is not a ``kind``-tagged struct
    with a ``check`` method, or when the tag is taken."""
    config = getattr(cls, "__struct_config__", None)
    if config is None or config.tag_field != "kind" or not isinstance(config.tag, str):
        raise TypeError(f"{cls.__name__}: a trigger kind is a msgspec.Struct with tag_field='kind' and a str tag")
    if not callable(getattr(cls, "check", None)):
        raise TypeError(f"{cls.__name__}: a trigger kind needs a check(signals, memory, now, *, endpoint) method")
    if config.tag in TRIGGER_KINDS and TRIGGER_KINDS[config.tag] is not cls:
        raise TypeError(f"trigger kind {config.tag!r} is registered already by {TRIGGER_KINDS[config.tag].__name__}")
    TRIGGER_KINDS[config.tag] = cls
    return cls


def require(ok: bool, field: str, expected: str, got: Any) -> None:
    """Raise ConfigError ``"<field>: expected <expected>, got <got>"`` unless ok."""
    if not ok:
        raise ConfigError(f"{field}: expected {expected}, got {got!r}")


def utc_text(ts: float) -> str:
    """``2026-12-07 12:03:11 UTC``: how reasons print a time."""
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
