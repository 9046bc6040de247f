"""common/reach.py's probe (no Ray): what a node tries, and how a failure
is worded. The per-node run on a real cluster is in
tests/integration/test_cluster_training.py."""

from __future__ import annotations

import socket

import pytest

from flywheel.common.reach import describe_failures, probe


def _closed_port() -> int:
    """A loopback port nothing listens on (the kernel's pick, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_sqlite_registry_and_a_local_folder_that_exist_pass(tmp_path):
    (tmp_path / "artifacts").mkdir()
    assert probe(f"sqlite://{tmp_path}/registry.db", str(tmp_path / "artifacts")) == []
    assert probe(str(tmp_path / "registry.db"), f"file://{tmp_path}/artifacts") == []


def test_a_sqlite_registry_in_a_folder_this_node_lacks_is_named(tmp_path):
    (tmp_path / "artifacts").mkdir()
    (failed,) = probe(f"sqlite://{tmp_path}/gone/registry.db", str(tmp_path / "artifacts"))
    assert failed["what"] == "registry"
    assert failed["address"] == f"{tmp_path}/gone/registry.db"
    assert f"its folder {tmp_path}/gone does not exist on this node" in failed["error"]


def test_an_artifact_folder_this_node_lacks_is_named(tmp_path):
    (failed,) = probe(f"sqlite://{tmp_path}/registry.db", str(tmp_path / "nowhere"))
    assert (failed["what"], failed["address"]) == ("artifact store", str(tmp_path / "nowhere"))
    assert "does not exist on this node" in failed["error"]


def test_a_postgresql_server_that_does_not_answer_is_named_without_its_password(tmp_path):
    port = _closed_port()
    (failed,) = probe(f"postgresql://flywheel:s3cret@127.0.0.1:{port}/registry", str(tmp_path), timeout_s=2)
    assert failed["what"] == "registry"
    assert failed["address"] == f"postgresql://127.0.0.1:{port}/registry"
    assert "Connection refused" in failed["error"]
    assert "s3cret" not in str(failed)


@pytest.fixture
def s3_env(monkeypatch):
    """botocore's standard variables, as a node's environment would hold them."""
    def at(endpoint: str) -> None:
        for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
    return at


def test_an_s3_endpoint_that_does_not_answer_is_named(tmp_path, s3_env):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    s3_env(endpoint)
    (failed,) = probe(f"sqlite://{tmp_path}/registry.db", "s3://flywheel-artifacts/models", timeout_s=2)
    assert failed["what"] == "artifact store"
    assert failed["address"] == f"s3://flywheel-artifacts at {endpoint}"
    assert "EndpointConnectionError" in failed["error"]


def test_an_s3_bucket_is_found_or_named_missing(tmp_path, s3_env):
    from s3 import MotoServer  # tests/s3.py

    server = MotoServer("127.0.0.1", _closed_port()).start()
    try:
        server.make_bucket("flywheel-artifacts")
        s3_env(server.endpoint)
        assert probe(f"sqlite://{tmp_path}/registry.db", "s3://flywheel-artifacts/models") == []
        (failed,) = probe(f"sqlite://{tmp_path}/registry.db", "s3://no-such-bucket/models")
        assert failed["address"] == f"s3://no-such-bucket at {server.endpoint}"
        assert "404" in failed["error"] or "Not Found" in failed["error"]
    finally:
        server.close()


def test_the_message_names_every_node_and_address_and_explains_loopback():
    message = describe_failures({
        "198.18.7.2 (node id 0123456789ab)": [
            {"what": "artifact store", "address": "s3://b at http://127.0.0.1:9000", "error": "refused"}],
        "198.18.7.1 (node id ba9876543210)": [
            {"what": "registry", "address": "postgresql://10.9.9.9:5432/reg", "error": "timeout"}],
    })
    assert "Ray node 198.18.7.2 (node id 0123456789ab) cannot reach the artifact store at " \
           "s3://b at http://127.0.0.1:9000: refused" in message
    assert "Ray node 198.18.7.1 (node id ba9876543210) cannot reach the registry at " \
           "postgresql://10.9.9.9:5432/reg: timeout" in message
    assert "A loopback address (127.0.0.1, localhost) is each node's own" in message


def test_the_message_gives_no_loopback_hint_where_none_is_named():
    message = describe_failures({"198.18.7.2 (node id 0123456789ab)": [
        {"what": "registry", "address": "/srv/reg/registry.db", "error": "its folder /srv/reg does not exist"}]})
    assert "loopback" not in message


def test_a_malformed_postgresql_uri_is_a_failure_not_an_exception(tmp_path):
    failed = probe("postgresql://user:s3cret@db:notaport/registry", str(tmp_path))
    assert [f["what"] for f in failed] == ["registry"]
    assert "s3cret" not in repr(failed)


def test_an_fsspec_store_that_fails_is_named_without_its_password(tmp_path):
    failed = probe(f"sqlite:///{tmp_path}/r.db", "ftp://user:s3cret@127.0.0.1:1/models")
    assert [f["what"] for f in failed] == ["artifact store"]
    assert "s3cret" not in repr(failed) and "127.0.0.1:1" in failed[0]["address"]
