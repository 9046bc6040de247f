"""The h2load driver of the latency benchmark: its pure parts, and that it
never sends load anywhere but loopback."""

from __future__ import annotations

import pytest

from flywheel.bench import h2load


def test_connections_are_split_evenly_over_replicas():
    assert h2load._split(32, 2) == [16, 16]
    assert h2load._split(5, 3) == [2, 2, 1]
    assert sum(h2load._split(31, 4)) == 31


def test_the_answer_bytes_come_from_the_traffic_line():
    out = ("finished in 5.00s, 2432.50 req/s, 319.15KB/s\n"
           "traffic: 1.56MB (1634560) total, 186.04KB (190506) headers (space savings 90.02%), "
           "1.16MB (1216250) data\n")
    assert h2load.parse_data_bytes(out) == 1216250
    assert h2load.parse_data_bytes("no such line") == 0


def test_load_goes_only_to_loopback():
    target = h2load.Target("http://10.1.2.3:8000/v2/models/m/infer", b"{}")
    with pytest.raises(ValueError, match="loopback"):
        h2load.run(["http://10.1.2.3:8000/v2/models/m/infer"], target, concurrency=1, duration_s=1)
