"""The webhook notifier against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from _poll import wait_for

from flywheel.loops.metrics import LoopMetrics
from flywheel.loops.notify import EVENTS, Notifier, WebhookSpec, backoff_delay, sign, verify_signature
from flywheel.protocol.errors import ConfigError


class Receiver:
    """A webhook receiver: records each request and answers with the next
    scripted status (then 200), optionally holding requests until released."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        self.release = threading.Event()
        self.release.set()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                receiver.release.wait(10)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=t"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def bodies(self) -> list[dict]:
        with self.lock:
            return [json.loads(body) for _, body in self.requests]

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def notifiers():
    made: list[Notifier] = []
    yield made
    for n in made:
        n.close(timeout=1)


def make(notifiers, *specs: WebhookSpec, **kwargs) -> Notifier:
    n = Notifier(list(specs), source="loop-a", **kwargs)
    notifiers.append(n)
    return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_events_arrive_in_order_with_the_documented_body_and_headers(receiver, notifiers):
    n = make(notifiers, WebhookSpec(url=receiver.url, backoff_s=0.01))
    for i in range(5):
        n.notify("run_started", {"run": i})
    wait_for(lambda: receiver.count() == 5, 10, "5 deliveries")
    bodies = receiver.bodies()
    assert [b["payload"]["run"] for b in bodies] == [0, 1, 2, 3, 4]
    assert set(bodies[0]) == {"event", "id", "ts", "source", "payload"}
    assert bodies[0]["event"] == "run_started"
    assert bodies[0]["source"] == "loop-a"
    assert len({b["id"] for b in bodies}) == 5
    headers = receiver.requests[0][0]
    assert headers["content-type"] == "application/json"
    assert headers["x-flywheel-event"] == "run_started"
    assert headers["x-flywheel-delivery"] == bodies[0]["id"]
    assert "x-flywheel-signature" not in headers
    assert n.stats() == {"delivered": 5, "dead_letters": 0, "queued": 0}


def test_signature_verifies_with_the_secret_and_not_with_another(receiver, notifiers):
    n = make(notifiers, WebhookSpec(url=receiver.url, secret="s3cret"))
    n.notify("drift_detected", {"model": "m"})
    wait_for(lambda: receiver.count() == 1, 10, "a delivery")
    headers, body = receiver.requests[0]
    header = headers["x-flywheel-signature"]
    assert header.startswith("sha256=")
    assert verify_signature("s3cret", body, header)
    assert not verify_signature("other", body, header)
    assert not verify_signature("s3cret", body + b" ", header)
    assert not verify_signature("s3cret", body, "")


def test_secret_file_is_read_at_start(receiver, notifiers, tmp_path):
    path = tmp_path / "key"
    path.write_text("from-file\n")
    n = make(notifiers, WebhookSpec(url=receiver.url, secret_file=str(path)))
    n.notify("run_finished", {})
    wait_for(lambda: receiver.count() == 1, 10, "a delivery")
    headers, body = receiver.requests[0]
    assert headers["x-flywheel-signature"] == sign("from-file", body)


def test_5xx_answers_are_retried_until_delivered(receiver, notifiers):
    receiver.statuses = [500, 503, 429]
    metrics = LoopMetrics()
    n = make(notifiers, WebhookSpec(url=receiver.url, backoff_s=0.01), metrics=metrics)
    n.notify("canary_promoted", {"version": "3"})
    wait_for(lambda: n.stats()["delivered"] == 1, 10, "the delivery after 3 failures")
    assert receiver.count() == 4
    assert len({b["id"] for b in receiver.bodies()}) == 1  # one delivery id across its attempts
    assert n.dead_letters == 0
    text = metrics.exposition().decode()
    assert f'flywheel_notify_deliveries_total{{event="canary_promoted",webhook="{host(receiver)}"}} 1.0' in text


def host(receiver: Receiver) -> str:
    return f"127.0.0.1:{receiver.server.server_address[1]}"


def test_gives_up_after_max_attempts_as_a_dead_letter(receiver, notifiers, caplog):
    receiver.statuses = [500] * 10
    metrics = LoopMetrics()
    n = make(notifiers, WebhookSpec(url=receiver.url, secret="s3cret", max_attempts=3, backoff_s=0.01),
             metrics=metrics)
    with caplog.at_level(logging.WARNING, logger="flywheel.loops.notify"):
        n.notify("run_failed", {"error": "boom"})
        wait_for(lambda: n.dead_letters == 1, 10, "a dead letter")
    assert receiver.count() == 3
    assert n.stats()["delivered"] == 0
    text = metrics.exposition().decode()
    assert f'flywheel_notify_dead_letters_total{{event="run_failed",webhook="{host(receiver)}"}} 1.0' in text
    messages = [r.getMessage() for r in caplog.records if r.name == "flywheel.loops.notify"]
    assert len(messages) == 1
    assert "HTTP 500" in messages[0] and "3 attempts" in messages[0]
    assert "s3cret" not in messages[0]
    assert "token=t" not in messages[0]  # the URL's query may hold credentials


def test_a_400_is_not_retried(receiver, notifiers):
    receiver.statuses = [400]
    n = make(notifiers, WebhookSpec(url=receiver.url, backoff_s=0.01))
    n.notify("gate_refused", {})
    n.notify("approval_needed", {})
    wait_for(lambda: n.stats()["delivered"] == 1, 10, "the second delivery")
    assert n.dead_letters == 1
    assert [b["event"] for b in receiver.bodies()] == ["gate_refused", "approval_needed"]


def test_408_is_retried(receiver, notifiers):
    receiver.statuses = [408]
    n = make(notifiers, WebhookSpec(url=receiver.url, backoff_s=0.01))
    n.notify("gate_refused", {})
    wait_for(lambda: n.stats()["delivered"] == 1, 10, "the delivery after a 408")
    assert receiver.count() == 2


def test_a_full_queue_drops_events_as_dead_letters(receiver, notifiers):
    receiver.release.clear()  # the first request is held, so the queue fills
    metrics = LoopMetrics()
    n = make(notifiers, WebhookSpec(url=receiver.url, max_queue=2), metrics=metrics)
    n.notify("run_started", {"i": 0})
    wait_for(lambda: n.stats()["queued"] == 0, 10, "the first delivery in flight")
    for i in range(1, 6):
        n.notify("run_started", {"i": i})  # 2 queue, 3 are dropped
    assert n.dead_letters == 3
    assert n.stats()["queued"] == 2
    receiver.release.set()
    wait_for(lambda: n.stats()["delivered"] == 3, 10, "the queued deliveries")
    assert [b["payload"]["i"] for b in receiver.bodies()] == [0, 1, 2]
    text = metrics.exposition().decode()
    assert f'flywheel_notify_dead_letters_total{{event="run_started",webhook="{host(receiver)}"}} 3.0' in text


def test_connection_refused_is_retried_then_dead_lettered(notifiers):
    slept: list[float] = []
    url = f"http://127.0.0.1:{free_port()}/hook"
    n = make(notifiers, WebhookSpec(url=url, max_attempts=4, backoff_s=0.01), sleep=slept.append)
    n.notify("canary_rolled_back", {})
    wait_for(lambda: n.dead_letters == 1, 10, "a dead letter")
    assert slept == [0.01, 0.02, 0.04]  # between 4 attempts, doubling


def test_backoff_doubles_and_is_capped():
    spec = WebhookSpec(url="http://127.0.0.1/", backoff_s=0.5)
    assert [backoff_delay(spec, k) for k in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff_delay(spec, 20) == 30.0


def test_events_filter_selects_what_each_webhook_gets(receiver, notifiers):
    other = Receiver()
    try:
        n = make(notifiers, WebhookSpec(url=receiver.url, events=["canary_rolled_back"]), WebhookSpec(url=other.url))
        n.notify("run_started", {})
        n.notify("canary_rolled_back", {})
        wait_for(lambda: other.count() == 2, 10, "both events at the unfiltered webhook")
        wait_for(lambda: receiver.count() == 1, 10, "the rollback at the filtered webhook")
        assert [b["event"] for b in receiver.bodies()] == ["canary_rolled_back"]
    finally:
        other.close()


def test_unknown_event_is_a_programming_error(notifiers):
    n = make(notifiers, WebhookSpec(url="http://127.0.0.1:9/"))
    with pytest.raises(ValueError, match="unknown notification event 'drift'"):
        n.notify("drift", {})


def test_close_drains_then_counts_what_is_left(receiver):
    n = Notifier([WebhookSpec(url=receiver.url)], source="loop-a")
    for i in range(3):
        n.notify("run_started", {"i": i})
    n.close(timeout=5)
    assert n.stats()["delivered"] == 3
    n.notify("run_finished", {})  # after close: not sent, counted
    assert n.dead_letters == 1


def test_close_gives_up_on_a_delivery_in_back_off():
    url = f"http://127.0.0.1:{free_port()}/hook"
    n = Notifier([WebhookSpec(url=url, max_attempts=5, backoff_s=30)], source="loop-a")
    n.notify("run_started", {})
    n.close(timeout=0.2)  # the default sleep is cut short by close
    wait_for(lambda: n.dead_letters == 1, 10, "the abandoned delivery counted")


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"url": "ftp://host/x"}, "url must be an http:// or https:// URL"),
        ({"url": "http:///x"}, "url must be"),
        ({"url": "http://h/", "secret": "a", "secret_file": "/k"}, "secret and secret_file are exclusive"),
        ({"url": "http://h/", "events": ["run_started", "nope"]}, r"events\[1\] must be one of .*'nope'"),
        ({"url": "http://h/", "timeout_s": 0}, "timeout_s must be > 0"),
        ({"url": "http://h/", "max_attempts": 0}, "max_attempts must be >= 1"),
        ({"url": "http://h/", "backoff_s": -1}, r"backoff_s must be in \[0, 30\]"),
        ({"url": "http://h/", "max_queue": 0}, "max_queue must be >= 1"),
    ],
)
def test_config_errors_name_the_field(fields, match):
    with pytest.raises(ConfigError, match=match):
        WebhookSpec(**fields)


def test_unknown_field_is_refused():
    import msgspec

    with pytest.raises(msgspec.ValidationError, match="unknown field `retries`"):
        msgspec.convert({"url": "http://h/", "retries": 3}, WebhookSpec)


def test_unreadable_secret_file_names_the_webhook(tmp_path):
    specs = [WebhookSpec(url="http://h/"), WebhookSpec(url="http://h/", secret_file=str(tmp_path / "missing"))]
    with pytest.raises(ConfigError, match=r"notify\[1\]\.secret_file: cannot read"):
        Notifier(specs, source="x")


def test_every_event_is_accepted_in_a_filter():
    assert WebhookSpec(url="https://h.example/", events=list(EVENTS)).events == list(EVENTS)
