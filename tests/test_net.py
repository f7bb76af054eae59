"""fleetlog.net: free ports and waiting for a server to listen (real sockets on 127.0.0.1)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

from fleetlog.net import PortWait, free_port, listening, wait_for_port


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
