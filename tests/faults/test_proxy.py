"""The fault proxy itself: what each mode does to bytes on a link (an echo server behind it)."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.faults.proxy import FaultProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    running = FaultProxy(server.server_address[1]).start()
    yield running
    running.close()
    server.shutdown()
    server.server_close()


def _connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.settimeout(5)
    return sock


def _recv(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_pass_through_and_delay(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        sock.sendall(b"ping")
        assert _recv(sock, 4) == b"ping"
        proxy.delay(0.5)
        started = time.monotonic()
        sock.sendall(b"slow")
        assert _recv(sock, 4) == b"slow"
        assert 0.45 < time.monotonic() - started < 2
        proxy.heal()
        started = time.monotonic()
        sock.sendall(b"fast")
        assert _recv(sock, 4) == b"fast"
        assert time.monotonic() - started < 0.3


def test_blackhole_holds_both_ways_and_delivers_after_the_heal(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        sock.sendall(b"a")
        assert _recv(sock, 1) == b"a"
        proxy.blackhole()
        sock.sendall(b"held")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        with _connect(proxy) as late:  # accepted, but nothing passes
            late.sendall(b"new")
            late.settimeout(0.3)
            with pytest.raises(TimeoutError):
                late.recv(10)
            proxy.heal()
            late.settimeout(5)
            assert _recv(late, 3) == b"new"
        sock.settimeout(5)
        assert _recv(sock, 4) == b"held", "held, not dropped: delivered once healed"


def test_blackhole_on_a_big_chunk(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        proxy.blackhole_on("down", 1000)
        sock.sendall(b"x" * 10)
        assert _recv(sock, 10) == b"x" * 10
        sock.sendall(b"y" * 2000)
        assert _recv(sock, 2000) == b"y" * 2000  # the chunk that trips it passes
        proxy.wait_tripped(1)
        sock.sendall(b"z")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        proxy.heal()
        sock.settimeout(5)
        assert _recv(sock, 1) == b"z"


@pytest.mark.parametrize("direction", ["up", "down"])
def test_cut_mid_frame_forwards_part_then_resets(proxy: FaultProxy, direction: str) -> None:
    with _connect(proxy) as sock:
        sock.sendall(b"hello")  # a connection's first chunk (a handshake) is never cut
        assert _recv(sock, 5) == b"hello"
        proxy.cut_mid_frame(1, direction=direction, keep=0.5, stall=0.5)  # type: ignore[arg-type]
        started = time.monotonic()
        sock.sendall(b"0123456789")
        received = b""
        with pytest.raises(ConnectionResetError):
            while chunk := sock.recv(10):
                received += chunk
        # Cut on the way up: the server got half and its echo is stalled; on the way
        # down: half of the echo came back.  Then the link stalls and is reset.
        assert received == (b"" if direction == "up" else b"01234")
        assert 0.4 < time.monotonic() - started < 3
    assert proxy.cuts_left() == 0
    with _connect(proxy) as sock:  # the next connection passes
        sock.sendall(b"again")
        assert _recv(sock, 5) == b"again"
