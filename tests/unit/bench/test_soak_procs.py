"""How the soak finds and measures processes (bench/_soak_procs.py), on
this test's own process and a child it starts: /proc, no Ray."""

import os
import socket
import subprocess
import sys

import pytest

from flywheel.bench._soak_procs import ESTABLISHED, LISTEN, children, front_pids, sample, tcp_sockets


@pytest.fixture
def child():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_children_lists_a_child_process(child):
    assert child in children(os.getpid())


def test_a_child_that_listens_on_no_tcp_port_is_no_grpc_front(child):
    assert child not in front_pids(os.getpid())


def test_tcp_sockets_counts_a_listener_and_a_connection_on_their_port():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert tcp_sockets(os.getpid(), LISTEN, port) == 1
        assert tcp_sockets(os.getpid(), ESTABLISHED, port) == 0
        with socket.create_connection(("127.0.0.1", port)):
            conn, _ = server.accept()
            with conn:
                assert tcp_sockets(os.getpid(), ESTABLISHED, port) == 1  # the accepted side is on that port


def test_sample_reads_rss_and_open_files_and_none_for_a_process_gone(child):
    s = sample(os.getpid())
    assert s["rss_kib"] > 10_000
    assert s["fds"] >= 3
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert sample(dead.pid) is None


def test_live_sockets_count_listeners_and_connections_and_not_pipes():
    base = sample(os.getpid())
    r, w = os.pipe()
    try:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            with socket.create_connection(server.getsockname()):
                conn, _ = server.accept()
                with conn:
                    now = sample(os.getpid())
    finally:
        os.close(r)
        os.close(w)
    assert now["sockets"] - base["sockets"] == 3  # the listener and both ends of the connection
    assert now["other_fds"] - base["other_fds"] == 2  # the pipe's two ends
    assert now["fds"] == now["sockets"] + now["other_fds"]
