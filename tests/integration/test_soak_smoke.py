"""The soak (bench/soak.py) end to end, shortened to ~40 s: a real deployment,
open-loop mixed load, the gRPC front of an ingress replica SIGKILLed and an
API key churned. The full soak (10 minutes, every fault) is `make soak`."""

from __future__ import annotations

import pytest

from flywheel.bench.soak import parse_args, run_soak

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    args = parse_args(["--minutes", "0.6", "--warmup", "5", "--rate", "30", "--seed", "3",
                       "--faults", "kill gRPC front,key churn", "--out", str(tmp_path_factory.mktemp("soak"))])
    return run_soak(args)


def test_every_planned_request_was_sent_and_none_failed_unexplained(report):
    s = report["summary"]
    assert s["sent"] == 36 * 30
    assert s["unexplained"] == 0, s["unexplained_samples"]
    assert set(s["by_transport"]) == {"http_json", "http_binary", "grpc"}


def test_the_killed_front_was_replaced_and_grpc_answered_after_it(report):
    (front,) = [f for f in report["summary"]["faults"] if f["kind"] == "kill gRPC front"]
    assert front["recovered_after_s"] is not None
    assert front["first_success_after_s"] is not None


def test_the_revoked_key_was_refused_and_its_successor_answered(report):
    (churn,) = report["revocations"]
    assert churn["lag_s"] is not None
    assert churn["new_key_ok_s"] is not None
    assert churn["refused"] >= 1


def test_every_kind_of_flywheel_process_was_measured(report):
    roles = {r["role"] for r in report["processes"] if r["state"] == "both"}
    assert roles == {"ingress", "gRPC front", "router", "drift", "ded-1"}
    assert all(r["rss_kib_start"] > 0 and r["fds_start"] > 0 for r in report["processes"] if r["state"] == "both")
