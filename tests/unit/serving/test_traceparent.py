"""W3C traceparent parsing and the span steps of a request record
(serving/_private/tracing.py); no OpenTelemetry, no server."""

from __future__ import annotations

import pytest

from flywheel.serving._private.tracing import RequestRecord, format_traceparent, parse_traceparent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{SPAN}-01"


def test_a_valid_traceparent_parses_to_its_ids_and_flags():
    tp = parse_traceparent(VALID)
    assert (tp.trace_id, tp.span_id, tp.flags) == (int(TRACE, 16), int(SPAN, 16), 1)


def test_bytes_and_surrounding_spaces_are_accepted():
    assert parse_traceparent(f" {VALID} ".encode()).trace_id == int(TRACE, 16)


def test_unsampled_flag_is_kept():
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-00").sampled is False


def test_a_later_version_with_more_fields_is_read_as_version_00():
    assert parse_traceparent(f"01-{TRACE}-{SPAN}-01-extra").span_id == int(SPAN, 16)


@pytest.mark.parametrize("value", [
    None, "", "garbage", VALID[:-1], VALID + "0", VALID + "-x",  # version 00 has exactly four fields
    f"ff-{TRACE}-{SPAN}-01",  # version ff is forbidden
    f"00-{'0' * 32}-{SPAN}-01", f"00-{TRACE}-{'0' * 16}-01",  # all-zero ids
    f"00-{TRACE.upper()}-{SPAN}-01",  # upper-case hex
    f"00-{TRACE[:-1]}g-{SPAN}-01", f"00_{TRACE}_{SPAN}_01", b"\xff" * 55,
])
def test_a_malformed_traceparent_is_ignored_not_an_error(value):
    assert parse_traceparent(value) is None


def test_format_round_trips():
    assert format_traceparent(int(TRACE, 16), int(SPAN, 16), 1) == VALID
    assert str(parse_traceparent(VALID)) == VALID


def _names(rec: RequestRecord) -> list[str]:
    return [s[0] for s in rec.steps()]


def test_a_request_that_failed_routing_has_only_a_route_step():
    rec = RequestRecord(None, "http")
    rec.routed = rec.end = rec.start + 10
    assert _names(rec) == ["route"]


def test_a_colocated_request_has_its_measured_steps_in_order():
    rec = RequestRecord(None, "http")
    t = rec.times
    rec.routed = rec.sent = rec.start + 10
    t.decode_start, t.decode_end = rec.start + 20, rec.start + 30
    rec.queue_ns, rec.compute_ns = 5, 7
    t.encode_start, t.encode_end = rec.start + 50, rec.start + 60
    rec.end = rec.start + 70
    steps = {name: (start, end, derived) for name, start, end, derived in rec.steps()}
    assert list(steps) == ["route", "decode", "queue", "compute", "encode"]
    assert steps["queue"] == (rec.start + 30, rec.start + 35, False)
    assert steps["compute"] == (rec.start + 35, rec.start + 42, False)
    assert steps["encode"] == (rec.start + 50, rec.start + 60, False)


def test_a_dedicated_replica_request_marks_decode_and_encode_derived():
    rec = RequestRecord(None, "grpc")
    rec.routed = rec.sent = rec.start + 10
    rec.queue_ns, rec.compute_ns = 20, 30
    rec.end = rec.start + 100
    steps = {name: (start, end, derived) for name, start, end, derived in rec.steps()}
    assert steps["decode"] == (rec.start + 10, rec.start + 50, True)
    assert steps["compute"][1] == rec.end
    assert steps["encode"][2] is True
