"""A request that kills every replica it reaches (a poison request) is sent
at most twice, then answered INTERNAL, and each lost replica is named in the
log and counted in the metrics; other requests keep being answered.

The replicas here are real loopback servers speaking the frame protocol,
that drop the connection (as a crashed process does) on a magic payload."""

from __future__ import annotations

import asyncio
import logging
import struct

from flywheel.protocol.errors import ErrorCode
from flywheel.serving._private.wire import OP_INFER, Call
from flywheel.serving.metrics import ServingMetrics
from flywheel.serving.router import Route, Router

REQ = struct.Struct("<IIBII")
RESP = struct.Struct("<IIBIIIIIB")
POISON = b"poison"


class CrashingReplica:
    """Echoes payloads; a poison payload (or the first ``crash_first``
    calls) drops the connection unanswered. Counts the drops ("deaths")."""

    def __init__(self, crash_first: int = 0) -> None:
        self.deaths = 0
        self._crash_first = crash_first
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size, req_id, *_ = REQ.unpack(await reader.readexactly(REQ.size))
                payload = await reader.readexactly(size)
                if payload == POISON or self._crash_first > 0:
                    self._crash_first -= 1
                    self.deaths += 1
                    writer.transport.abort()
                    return
                writer.write(RESP.pack(len(payload), req_id, 0, 0, 0, 0, 1, 0, 1) + payload)
        except asyncio.IncompleteReadError:
            writer.close()


def _forward(replica: CrashingReplica, payloads: list[bytes]):
    async def main():
        port = await replica.start()
        router = Router([Route("m", "1", port)], ServingMetrics([("m", "1")]))
        try:
            replies = []
            for payload in payloads:
                d = router.route("m", None)
                replies.append(await asyncio.wait_for(router.forward(d.model, d.endpoint, Call(OP_INFER, payload)), 10))
            return replies, router.metrics, port
        finally:
            router.close()
            replica.server.close()

    return asyncio.run(main())


def test_a_poison_request_is_sent_twice_at_most_then_answered_internal(caplog):
    replica = CrashingReplica()
    with caplog.at_level(logging.WARNING, logger="flywheel.serving.router"):
        (poisoned, after), metrics, port = _forward(replica, [POISON, b"fine"])
    assert replica.deaths == 2  # the first try and the one retry, no third
    assert poisoned.code == ErrorCode.INTERNAL
    assert b"two model replicas were lost while they had this request" in poisoned.payload
    assert (after.code, after.payload) == (0, b"fine")  # the next request is answered
    lost = [r.getMessage() for r in caplog.records if "was lost with a call in flight" in r.getMessage()]
    assert lost == [
        f"model m:1: replica 127.0.0.1:{port} was lost with a call in flight; sending it once more on a new connection",
        f"model m:1: replica 127.0.0.1:{port} was lost with a call in flight; not sending it again",
    ]


def test_lost_calls_are_counted_and_the_lost_replica_named_in_the_metrics():
    replica = CrashingReplica()
    _, metrics, port = _forward(replica, [POISON])
    text = metrics.render().decode()
    assert 'flywheel_replica_lost_calls_total{model="m",version="1"} 2' in text
    assert f'flywheel_replica_lost_calls_by_replica_total{{model="m",replica="127.0.0.1:{port}",version="1"}} 2' in text
    assert 'flywheel_replica_retries_total{model="m",version="1"} 1' in text
    assert 'flywheel_requests_total{model="m",outcome="internal",version="1"} 1' in text


def test_a_call_whose_replica_died_once_is_answered_by_the_retry():
    replica = CrashingReplica(crash_first=1)
    (reply,), metrics, _ = _forward(replica, [b"abc"])
    assert (reply.code, reply.payload) == (0, b"abc")
    assert replica.deaths == 1
    assert 'flywheel_replica_lost_calls_total{model="m",version="1"} 1' in metrics.render().decode()


def test_only_the_latest_lost_replicas_are_named():
    from flywheel.serving.metrics import NAMED_LOST_REPLICAS

    stats = ServingMetrics([("m", "1")]).for_model("m", "1")
    for i in range(NAMED_LOST_REPLICAS + 5):
        stats.replica_lost(f"r{i}")
    stats.replica_lost("r10")  # seen again: now the latest
    named = stats.lost_by_replica()
    assert len(named) == NAMED_LOST_REPLICAS
    assert "r0" not in named
    assert list(named)[-1] == "r10"
    assert named["r10"] == 2
