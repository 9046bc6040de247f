"""Request metrics shared by the ingress replicas of one node: each keeps its
own slot of one shared-memory file, and any of them renders the sum."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flywheel.serving._private.wire import Stats
from flywheel.serving.metrics import ServingMetrics

MODELS = [("m", "1"), ("m", "2")]
OK = Stats(queue_us=100, compute_us=300, batch_rows=4, queue_depth=2, leader=True)


def samples(metrics: ServingMetrics) -> dict:
    out = {}
    for fam in text_string_to_metric_families(metrics.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def requests(metrics, version="1", outcome="ok"):
    return samples(metrics).get(
        ("flywheel_requests_total", (("model", "m"), ("outcome", outcome), ("version", version))), 0)


@pytest.fixture
def key():
    k = f"test-{uuid.uuid4()}"
    yield k
    path = ServingMetrics(MODELS, key=k).path  # (attaching creates it, if gone)
    os.unlink(path)


def test_histograms_count_by_upper_bound_and_keep_sums():
    m = ServingMetrics(MODELS)
    m.observe("m", "1", "ok", 0.0003, OK)
    m.observe("m", "1", "ok", 0.0005, OK)  # on a bound: counted in it ("le")
    m.observe("m", "1", "invalid_argument", 2.0, Stats())
    s = samples(m)
    lat = lambda le: s[("flywheel_request_latency_seconds_bucket", (("le", le), ("model", "m"), ("version", "1")))]  # noqa: E731
    assert (lat("0.00025"), lat("0.0005"), lat("2.5"), lat("+Inf")) == (0, 2, 3, 3)
    assert s[("flywheel_request_latency_seconds_sum", (("model", "m"), ("version", "1")))] == pytest.approx(2.0008)
    assert s[("flywheel_batch_size_count", (("model", "m"), ("version", "1")))] == 2
    assert requests(m) == 2
    assert requests(m, outcome="invalid_argument") == 1
    assert requests(m, version="2") == 0


def test_replicas_with_one_key_add_up_and_a_departed_ones_counts_stay(key):
    a, b = ServingMetrics(MODELS, key=key), ServingMetrics(MODELS, key=key)
    for _ in range(3):
        a.observe("m", "1", "ok", 0.001, OK)
    b.observe("m", "1", "ok", 0.001, OK)
    assert requests(a) == requests(b) == 4
    b.close()  # its slot is free, its counts remain: counters never go back
    assert requests(a) == 4
    c = ServingMetrics(MODELS, key=key)  # takes the free slot over and goes on counting
    c.observe("m", "1", "ok", 0.001, OK)
    assert requests(a) == 5
    path = a.path
    a.close()
    assert os.path.exists(path)
    c.close()
    assert not os.path.exists(path)  # the last one out removes the file
    assert requests(a) == 5  # and a closed one still renders


def test_a_killed_replicas_slot_is_taken_over(key):
    code = (
        "import os\n"
        "from flywheel.serving.metrics import ServingMetrics\n"
        "from flywheel.serving._private.wire import Stats\n"
        f"m = ServingMetrics({MODELS!r}, key={key!r})\n"
        "m.observe('m', '1', 'ok', 0.001, Stats())\n"
        "os._exit(0)\n"  # dies without giving its slot back
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    a = ServingMetrics(MODELS, key=key)
    assert requests(a) == 1
    assert samples(a)[("flywheel_ingress_replicas", ())] == 1  # the dead one is not counted as alive
    a.close()


def test_files_left_by_killed_replicas_are_swept_by_the_next_deployment(key):
    code = (
        "import os\n"
        "from flywheel.serving.metrics import ServingMetrics\n"
        f"m = ServingMetrics({MODELS!r}, key={key + '-gone'!r})\n"
        "print(m.path, flush=True)\n"
        "os._exit(0)\n"
    )
    gone = subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True,
                          text=True).stdout.strip()
    assert os.path.exists(gone)
    alive = ServingMetrics(MODELS, key=key + "-alive")  # another deployment, still running
    assert not os.path.exists(gone)
    other = ServingMetrics(MODELS, key=key)
    assert os.path.exists(alive.path)  # a live one is left alone
    alive.close()
    other.close()


def test_http_connection_counts_add_up_over_replicas_and_open_is_a_live_gauge(key):
    from flywheel.serving.metrics import HTTP_HEAD_TIMEOUT, HTTP_IDLE_TIMEOUT, HTTP_OPEN, HTTP_REFUSED

    a, b = ServingMetrics(MODELS, key=key), ServingMetrics(MODELS, key=key)
    a.http_counts[HTTP_REFUSED] += 2
    b.http_counts[HTTP_REFUSED] += 1
    a.http_counts[HTTP_HEAD_TIMEOUT] += 5
    b.http_counts[HTTP_IDLE_TIMEOUT] += 7
    a.http_counts[HTTP_OPEN] = 3
    b.http_counts[HTTP_OPEN] = 4
    s = samples(a)
    assert s[("flywheel_http_connections_refused_total", ())] == 3
    assert s[("flywheel_http_connections_closed_total", (("reason", "head_timeout"),))] == 5
    assert s[("flywheel_http_connections_closed_total", (("reason", "idle_timeout"),))] == 7
    assert s[("flywheel_http_connections_open", ())] == 7
    # the model counters next to them are untouched
    assert requests(a) == 0
    b.close()  # its connections are gone, its counts stay
    s = samples(a)
    assert s[("flywheel_http_connections_open", ())] == 3
    assert s[("flywheel_http_connections_refused_total", ())] == 3
    a.close()
