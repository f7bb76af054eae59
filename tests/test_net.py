"""fleetlog.net: free ports and waiting for a server to listen (real sockets on 127.0.0.1)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from fleetlog.net import PortWait, free_port, is_on_this_machine, listening, wait_for_port


def test_a_free_port_is_free_and_listening_sees_a_listener() -> None:
    port = free_port()
    assert not listening(port)
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen()
        assert listening(port)
        assert wait_for_port(port, timeout=1) is PortWait.LISTENING


def test_waits_for_a_server_that_starts_late() -> None:
    port = free_port()
    server = socket.socket()
    started = threading.Event()

    def late() -> None:
        time.sleep(0.3)
        server.bind(("127.0.0.1", port))
        server.listen()
        started.set()

    thread = threading.Thread(target=late)
    thread.start()
    try:
        assert wait_for_port(port, timeout=10) is PortWait.LISTENING
        assert started.is_set()
    finally:
        thread.join(5)
        server.close()


def test_ends_at_once_when_the_process_that_should_listen_exits() -> None:
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    began = time.monotonic()
    outcome = wait_for_port(free_port(), timeout=30, gone=lambda: process.poll() is not None)
    assert outcome is PortWait.GONE and process.returncode == 3
    assert time.monotonic() - began < 25, "did not wait for the timeout"


def test_times_out_when_nothing_listens() -> None:
    assert wait_for_port(free_port(), timeout=0.3) is PortWait.TIMED_OUT


@pytest.mark.parametrize(("url", "here"), [
    ("redis://127.0.0.1:6379/0", True),
    ("redis://127.1.2.3:6379", True),
    ("redis://localhost:6379", True),
    ("redis://[::1]:6379", True),
    ("rediss://user:secret@127.0.0.1:6380", True),
    ("redis+cluster://127.0.0.1:7000", True),
    ("unix:///run/redis/redis.sock?db=1", True),
    ("redis://10.0.0.5:6379", False),
    ("redis://redis.internal:6379", False),
    ("redis://[2001:db8::1]:6379", False),
    ("redis://localhost.example.com:6379", False),
    ("not a url", False),
])
def test_whether_a_url_names_this_machine_is_told_from_the_url_alone(url: str, here: bool) -> None:
    assert is_on_this_machine(url) is here
