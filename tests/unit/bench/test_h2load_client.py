"""The harness's h2load client: choosing it, its commands, reading its output,
and the client-bound rule. No servers: h2load's output is captured text."""

from __future__ import annotations

import pytest

from _factories import _reply

from flywheel.bench import h2load
from flywheel.bench.harness import parse_scenario
from flywheel.bench.harness.h2load_pool import split_by_weight, targets
from flywheel.bench.harness.payloads import Bodies, WorkPlan
from flywheel.bench.harness.pool import merge_replies
from flywheel.bench.harness.report import client_line
from flywheel.bench.harness.runner import Report, choose_client, notes_for
from flywheel.protocol.errors import ConfigError

# a real h2load 1.52 run (stdout) and the head of its --log-file
CAPTURED_OUT = """\
finished in 1.00s, 23.00 req/s, 2.65KB/s
requests: 23 total, 24 started, 23 done, 23 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 24 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 2.65KB (2710) total, 1.88KB (1920) headers (space savings 0.00%), 46B (46) data
                     min         max         mean         sd        +/- sd
time for request:      704us     48.45ms     42.56ms      9.25ms    95.65%
"""
CAPTURED_LOG = "1796650005399804\t200\t704\n1796650005400536\t200\t42508\n1796650005443066\t503\t48022\n" \
               "1796650005491100\t0\t1000\n"


def _sc(**fields):
    return parse_scenario({"model": "m", **fields})


def test_auto_picks_h2load_only_when_installed_and_the_scenario_fits():
    one_body = _sc(payload={"variants": 1})
    assert choose_client(one_body, installed=True) == "h2load"
    assert choose_client(one_body, installed=False) == "locust"
    assert choose_client(_sc(), installed=True) == "locust"  # 8 payload variants
    assert choose_client(_sc(payload={"variants": 1}, max_requests=10), installed=True) == "locust"
    assert choose_client(_sc(payload={"variants": 1}, client="locust"), installed=True) == "locust"


def test_h2load_asked_for_but_missing_names_the_field_and_the_install():
    with pytest.raises(ConfigError, match=r"client: h2load is not installed: apt-get install nghttp2-client"):
        choose_client(_sc(payload={"variants": 1}, client="h2load"), installed=False)


@pytest.mark.parametrize("fields, feature", [
    ({}, "payload.variants is 8"),
    ({"payload": {"variants": 1}, "max_requests": 100}, "max_requests"),
    ({"payload": {"variants": 1, "outputs": [{"name": "y"}]}}, "payload.outputs"),
])
def test_a_scenario_h2load_cannot_drive_is_refused_naming_the_feature(fields, feature):
    with pytest.raises(ConfigError, match=rf"client: h2load cannot drive this scenario: {feature}"):
        _sc(client="h2load", **fields)


def test_an_unknown_client_is_refused():
    with pytest.raises(ConfigError, match=r"\$\.client"):
        _sc(client="wrk")


def test_closed_loop_http_command():
    t = h2load.Target("http://127.0.0.1:8000/v2/models/m/infer", b"{}", ("content-type: application/json",))
    cmd = h2load.command(t.url, t, "/tmp/body", 4, 2.4, "/tmp/log", threads=2)
    assert cmd == ["h2load", "-c", "4", "-m", "1", "-t", "2", "-D", "2", "-d", "/tmp/body",
                   "--log-file", "/tmp/log", "--h1", "-H", "content-type: application/json", t.url]


def test_fixed_rate_grpc_command_speaks_h2c_at_each_connections_share():
    t = h2load.Target("http://127.0.0.1:9000/x", b"", ("content-type: application/grpc",), grpc=True)
    cmd = h2load.command(t.url, t, "/b", 2, 0.2, "/l", rps=12.5, threads=8)
    assert "--h1" not in cmd
    assert "--rps=12.5" in cmd
    assert cmd[cmd.index("-D") + 1] == "1"   # at least one whole second
    assert cmd[cmd.index("-t") + 1] == "2"   # no more threads than connections


def _plan(weights, authorization=""):
    bodies = Bodies(json=b'{"inputs": []}', binary=b"HEADERraw", binary_header_length=6, grpc=b"\x0a\x01m")
    return WorkPlan(http="http://127.0.0.1:8000", grpc="127.0.0.1:9000", infer_path="/v2/models/m/infer",
                    grpc_method="/inference.GRPCInferenceService/ModelInfer", weights=weights, timeout_s=10,
                    variants=[bodies], outputs=[], batch=1, authorization=authorization)


def test_grpc_target_is_a_length_prefixed_message_with_grpc_headers():
    t = targets(_plan({"grpc": 1.0}, "Bearer k"))["grpc"]
    assert t.url == "http://127.0.0.1:9000/inference.GRPCInferenceService/ModelInfer"
    assert t.body == b"\x00\x00\x00\x00\x03\x0a\x01m"
    assert t.grpc
    assert set(t.headers) == {"content-type: application/grpc", "te: trailers", "authorization: Bearer k"}


def test_binary_target_says_where_the_json_header_ends():
    t = targets(_plan({"http_binary": 1.0}))["http_binary"]
    assert "inference-header-content-length: 6" in t.headers
    assert t.body == b"HEADERraw"
    assert set(targets(_plan({"http_json": 1.0, "grpc": 2.0}))) == {"http_json", "grpc"}


def test_captured_output_and_log_are_read():
    assert h2load.parse_data_bytes(CAPTURED_OUT) == 46


def test_log_lines_split_into_good_latencies_and_bad_statuses(tmp_path):
    (tmp_path / "log").write_text(CAPTURED_LOG)
    ok, bad = h2load.read_log(str(tmp_path / "log"))
    assert ok == [704e-6, 42508e-6]
    assert bad == [503, 0]


def test_grpc_answers_the_data_cannot_cover_were_errors():
    t = h2load.Target("u", b"", grpc=True, good_bytes=10)
    assert h2load.grpc_without_message(t, answered=10, data=8 * 15) == 2
    assert h2load.grpc_without_message(t, answered=10, data=10 * 15) == 0
    assert h2load.grpc_without_message(h2load.Target("u", b""), answered=10, data=0) == 0


def test_users_and_connections_are_shared_by_weight():
    assert split_by_weight(48, {"http_json": 1, "http_binary": 1, "grpc": 1}) == \
        {"http_json": 16, "http_binary": 16, "grpc": 16}
    assert split_by_weight(4, {"http_json": 1, "grpc": 3}) == {"http_json": 1, "grpc": 3}
    assert sum(split_by_weight(2, {"a": 1, "b": 1, "c": 1}).values()) == 2


@pytest.mark.parametrize("cpu, busy, expected", [
    (0.90, 0.6, "client"),   # a core's worth of client while the host had room: client-bound
    (0.89, 0.6, "server"),   # just under the threshold
    (0.97, 0.99, "host"),    # client and server both ran out of the host's cores
])
def test_client_bound_rule(cpu, busy, expected):
    step = merge_replies("users", 4, 4, None, [_reply([0.001] * 100, cpu=cpu, busy=busy)])
    assert step.limited_by == expected


def test_report_says_which_client_ran_and_whether_it_was_the_limit():
    bound = merge_replies("users", 4, 4, None, [_reply([0.001] * 10, cpu=0.95, busy=0.5)])
    free = merge_replies("users", 8, 8, None, [_reply([0.001] * 10, cpu=0.3, busy=0.5)])
    report = Report(name="r", mode="load", started_at="", host={}, scenario={}, client="h2load",
                    steps=[bound, free])
    assert client_line(report) == \
        "h2load (C, nghttp2); client-bound in 1 of 2 steps: those figures are a lower bound"
    report.steps = [free]
    assert client_line(report) == "h2load (C, nghttp2); not the limit in any of 1 steps"
    [note] = [n for n in notes_for([bound, free], None, "h2load") if n.startswith("client-bound")]
    assert "in 1 of 2 steps: the figures are a lower bound" in note
    assert ">= 90% of a core" in note


def test_cli_client_option_is_validated_before_any_load(tmp_path, capsys):
    from flywheel.cli import main

    (tmp_path / "s.yaml").write_text("model: digits\n")  # 8 payload variants
    assert main(["bench", "run", str(tmp_path / "s.yaml"), "--client", "h2load"]) == 2
    assert "client: h2load cannot drive this scenario: payload.variants is 8" in capsys.readouterr().err
