"""Webhook notifications of loop events: signed JSON POSTs, retried with
back-off on a background thread per webhook, never on the controller's path.

Each POST body is JSON ``{"event", "id", "ts", "source", "payload"}`` with the
headers ``Content-Type: application/json``, ``X-Flywheel-Event``,
``X-Flywheel-Delivery`` (the id) and, when the webhook has a secret,
``X-Flywheel-Signature: sha256=<hex HMAC-SHA256(secret, raw body)>``; a
receiver checks it with :func:`verify_signature` over the raw bytes it got.

A 2xx answer is delivered. A 5xx, 408, 429, connection error or timeout is
retried (0.5 s, 1 s, 2 s, ... capped at 30 s, or the server's numeric
``Retry-After`` when it is shorter than the cap) up to ``max_attempts``; any
other answer (a 3xx or 4xx) is a configuration problem and not retried. A
delivery given up on, or an event dropped because the webhook's queue is full
or the notifier closed, is a dead letter: counted, logged once with the reason,
and the payload is lost.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import logging
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import msgspec

from flywheel.protocol.errors import ConfigError

if TYPE_CHECKING:
    from flywheel.loops.metrics import LoopMetrics

log = logging.getLogger(__name__)

EVENTS = ("drift_detected", "run_started", "run_finished", "run_failed", "gate_refused", "approval_needed",
          "canary_promoted", "canary_rolled_back", "trigger_suppressed")

MAX_BACKOFF_S = 30.0
_RETRIED_STATUSES = (408, 429)
_ENCODER = msgspec.json.Encoder()


class WebhookSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One webhook that loop events are POSTed to."""

    url: str
    """``http://`` or ``https://`` URL the events are POSTed to."""
    secret: str = ""
    """HMAC-SHA256 key of the ``X-Flywheel-Signature`` header ("" with no
    ``secret_file``: unsigned)."""
    secret_file: str = ""
    """A file holding the key instead (read when the notifier starts, one
    trailing newline stripped), so that the key stays out of the loop spec."""
    events: list[str] = []
    """Events to send (each one of ``EVENTS``); empty: all of them."""
    timeout_s: float = 5.0
    """Connect and answer time-out of one attempt."""
    max_attempts: int = 5
    """Attempts per delivery, the first one included."""
    backoff_s: float = 0.5
    """Wait before the first retry; doubles after each, capped at 30 s."""
    max_queue: int = 1000
    """Deliveries waiting for this webhook; more are dropped as dead letters."""

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"url must be an http:// or https:// URL with a host, not {self.url!r}")
        if self.secret and self.secret_file:
            raise ConfigError("secret and secret_file are exclusive: give the key one way")
        for i, event in enumerate(self.events):
            if event not in EVENTS:
                raise ConfigError(f"events[{i}] must be one of {', '.join(EVENTS)}, not {event!r}")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0, not {self.timeout_s}")
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, not {self.max_attempts}")
        if not 0 <= self.backoff_s <= MAX_BACKOFF_S:
            raise ConfigError(f"backoff_s must be in [0, {MAX_BACKOFF_S:g}], not {self.backoff_s}")
        if self.max_queue < 1:
            raise ConfigError(f"max_queue must be >= 1, not {self.max_queue}")

    @property
    def host(self) -> str:
        """``host[:port]`` of the URL, without credentials: the label that
        logs and metrics name the webhook by (URLs may carry tokens)."""
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


def sign(secret: str, body: bytes) -> str:
    """The ``X-Flywheel-Signature`` value of ``body``: ``sha256=<hex>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str) -> bool:
    """Whether ``header`` (an ``X-Flywheel-Signature`` value) signs the raw
    ``body`` with ``secret``; compares in constant time."""
    return hmac.compare_digest(sign(secret, body).encode(), (header or "").encode())


def backoff_delay(spec: WebhookSpec, failed_attempts: int) -> float:
    """Wait after the ``failed_attempts``-th failed attempt (1-based)."""
    return min(spec.backoff_s * 2 ** (failed_attempts - 1), MAX_BACKOFF_S)


class _Delivery(msgspec.Struct):
    event: str
    id: str
    body: bytes


class _Attempt(msgspec.Struct):
    ok: bool
    retry: bool
    reason: str
    retry_after: float | None = None


class _Webhook:
    """One webhook's queue and its delivery thread."""

    def __init__(self, spec: WebhookSpec, secret: str, owner: Notifier) -> None:
        self.spec, self.secret, self.owner = spec, secret, owner
        self.host = spec.host
        parts = urlsplit(spec.url)
        self._hostname = parts.hostname or ""
        self._port = parts.port
        # built once: loading the CA store costs milliseconds
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.events = frozenset(spec.events or EVENTS)
        self.queue: deque[_Delivery] = deque()
        self.cond = threading.Condition()
        self.busy = False
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name=f"fw-notify-{self.host}", daemon=True)
            self.thread.start()

    def put(self, delivery: _Delivery) -> bool:
        with self.cond:
            if len(self.queue) >= self.spec.max_queue:
                return False
            self.queue.append(delivery)
            self.cond.notify()
        return True

    def idle(self) -> bool:
        with self.cond:
            return not self.queue and not self.busy

    def _run(self) -> None:
        owner = self.owner
        while True:
            with self.cond:
                while not self.queue and not owner._stopping.is_set():
                    self.cond.wait()
                if owner._stopping.is_set():
                    left, self.busy = list(self.queue), False
                    self.queue.clear()
                    break
                delivery = self.queue.popleft()
                self.busy = True
            try:
                self._deliver(delivery)
            except Exception as exc:  # the thread must survive anything one delivery does
                owner._dead_letter(self, delivery, f"internal error: {exc!r}")
            with self.cond:
                self.busy = False
        for delivery in left:
            owner._dead_letter(self, delivery, "notifier closed before delivery")

    def _deliver(self, delivery: _Delivery) -> None:
        owner, spec = self.owner, self.spec
        attempt = 0
        while True:
            attempt += 1
            result = self._post(delivery)
            if result.ok:
                owner._delivered(self, delivery)
                return
            if not result.retry or attempt >= spec.max_attempts:
                why = "not retried" if not result.retry else f"gave up after {attempt} attempts"
                owner._dead_letter(self, delivery, f"{result.reason} ({why})")
                return
            delay = backoff_delay(spec, attempt)
            if result.retry_after is not None:
                delay = min(max(result.retry_after, 0.0), MAX_BACKOFF_S)
            owner._sleep(delay)
            if owner._stopping.is_set():
                owner._dead_letter(self, delivery, f"{result.reason} (notifier closed while retrying)")
                return

    def _post(self, delivery: _Delivery) -> _Attempt:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "flywheel-notify",
            "X-Flywheel-Event": delivery.event,
            "X-Flywheel-Delivery": delivery.id,
        }
        if self.secret:
            headers["X-Flywheel-Signature"] = sign(self.secret, delivery.body)
        if self._tls is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self._hostname, self._port, timeout=self.spec.timeout_s, context=self._tls)
        else:
            conn = http.client.HTTPConnection(self._hostname, self._port, timeout=self.spec.timeout_s)
        try:
            conn.request("POST", self._target, body=delivery.body, headers=headers)
            resp = conn.getresponse()
            resp.read(65536)  # a little of the body, so the server is not cut off mid-answer
            status = resp.status
            retry_after = _seconds(resp.getheader("Retry-After"))
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timeout, TLS, bad answer
            return _Attempt(ok=False, retry=True, reason=f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()
        if 200 <= status < 300:
            return _Attempt(ok=True, retry=False, reason="")
        retry = status >= 500 or status in _RETRIED_STATUSES
        return _Attempt(ok=False, retry=retry, reason=f"HTTP {status}", retry_after=retry_after if retry else None)


def _seconds(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds (its date form is ignored: back-off applies)."""
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Notifier:
    """Sends loop events to webhooks without ever blocking the caller.

    ``source`` names the sender in every body (e.g. the loop's name).
    ``sleep`` waits between attempts; by default an internal wait that
    :meth:`close` cuts short. Thread-safe.
    """

    def __init__(self, specs: list[WebhookSpec], *, source: str, metrics: LoopMetrics | None = None,
                 sleep: Callable[[float], None] | None = None) -> None:
        """Reads each ``secret_file`` now: ConfigError naming it when it cannot."""
        self.source = source
        self._metrics = metrics
        self._stopping = threading.Event()
        self._closed = False
        self._sleep = sleep if sleep is not None else self._stopping.wait
        self._lock = threading.Lock()
        self._counts = {"delivered": 0, "dead_letters": 0}
        self._hooks = [_Webhook(spec, read_secret(spec, i), self) for i, spec in enumerate(specs)]
        if metrics is not None:
            for hook in self._hooks:
                metrics.add_webhook(hook.host, sorted(hook.events))

    def start(self) -> None:
        """Start the delivery threads (``notify`` also does, on first use)."""
        for hook in self._hooks:
            hook.start()

    def notify(self, event: str, payload: dict) -> None:
        """Queue ``event`` with ``payload`` for every webhook that wants it and
        return at once. ValueError for an event not in ``EVENTS``; TypeError
        for a payload msgspec cannot encode as JSON (programming errors both).
        Delivery problems are never raised: they end as dead letters."""
        if event not in EVENTS:
            raise ValueError(f"unknown notification event {event!r}; known: {', '.join(EVENTS)}")
        ts = time.time()
        for hook in self._hooks:
            if event not in hook.events:
                continue
            delivery_id = uuid.uuid4().hex
            body = _ENCODER.encode({"event": event, "id": delivery_id, "ts": ts, "source": self.source,
                                    "payload": payload})
            delivery = _Delivery(event, delivery_id, body)
            if self._closed:
                self._dead_letter(hook, delivery, "notifier closed")
            elif not hook.put(delivery):
                self._dead_letter(hook, delivery, f"queue full ({hook.spec.max_queue} waiting)")
            else:
                hook.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking events, give the queued ones up to ``timeout`` seconds
        to be delivered, then stop the threads; what is still undelivered is
        counted as dead letters."""
        self._closed = True
        deadline = time.monotonic() + timeout
        while any(h.thread is not None and not h.idle() for h in self._hooks) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stopping.set()
        for hook in self._hooks:
            with hook.cond:
                hook.cond.notify_all()
        for hook in self._hooks:
            if hook.thread is not None:  # one never started has nothing queued (put starts it)
                hook.thread.join(max(0.0, deadline - time.monotonic()) + 0.1)

    @property
    def dead_letters(self) -> int:
        with self._lock:
            return self._counts["dead_letters"]

    def stats(self) -> dict:
        """``{"delivered", "dead_letters", "queued"}`` over all webhooks."""
        with self._lock:
            counts = dict(self._counts)
        counts["queued"] = sum(len(h.queue) for h in self._hooks)
        return counts

    def _delivered(self, hook: _Webhook, delivery: _Delivery) -> None:
        with self._lock:
            self._counts["delivered"] += 1
        if self._metrics is not None:
            self._metrics.delivered(hook.host, delivery.event)

    def _dead_letter(self, hook: _Webhook, delivery: _Delivery, reason: str) -> None:
        with self._lock:
            self._counts["dead_letters"] += 1
        if self._metrics is not None:
            self._metrics.dead_letter(hook.host, delivery.event)
        log.warning("webhook %s: %s notification %s not delivered: %s", hook.host, delivery.event, delivery.id,
                    reason)


def read_secret(spec: WebhookSpec, index: int) -> str:
    """The webhook's HMAC key: ``secret``, or the contents of ``secret_file``
    (ConfigError naming ``notify[index].secret_file`` when unreadable or empty)."""
    if not spec.secret_file:
        return spec.secret
    try:
        text = Path(spec.secret_file).read_text()
    except OSError as exc:
        raise ConfigError(f"notify[{index}].secret_file: cannot read {spec.secret_file!r}: "
                          f"{exc.strerror or exc}") from None
    secret = text[:-1] if text.endswith("\n") else text
    if not secret:
        raise ConfigError(f"notify[{index}].secret_file: {spec.secret_file!r} is empty")
    return secret
