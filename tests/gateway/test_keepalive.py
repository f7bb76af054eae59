"""Keepalive: a quiet device is pinged; one that answers stays, one that does not is closed (1001).

The gateway pings in one sweep over its connections (no task or timer per
connection); these tests run it with ``ping_interval`` 0.4 s.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from pathlib import Path

import websockets

from fleetlog.gateway.server import DeviceConnection
from tests.conftest import Processes
from tests.helpers import RECEIVED, STORED, legacy_frame, send_legacy

PING_INTERVAL = 0.4
ENV = {"FLEETLOG_PING_INTERVAL": str(PING_INTERVAL)}


def test_per_connection_objects_have_no_instance_dict() -> None:
    """Tens of thousands are held at once: ``__slots__`` only."""
    from fleetlog.gateway.connection import Connection
    from fleetlog.gateway.handshake import HandshakeProtocol
    from fleetlog.gateway.messages import Reassembler

    for cls in (DeviceConnection, Connection, HandshakeProtocol, Reassembler):
        assert "__dict__" not in dir(cls), cls


async def test_a_quiet_device_that_answers_pings_stays_connected(
        redis_url: str, processes: Processes, tmp_path: Path) -> None:
    _, port = processes.gateway(redis_url, tmp_path / "data", env=ENV)
    async with websockets.connect(f"ws://127.0.0.1:{port}", ping_interval=None) as ws:
        assert await send_legacy(ws, legacy_frame("quiet-1", 1)) == [RECEIVED, STORED]
        # Quiet for several intervals: websockets answers the gateway's pings by itself.
        await asyncio.sleep(6 * PING_INTERVAL)
        assert ws.state is websockets.protocol.State.OPEN
        assert await send_legacy(ws, legacy_frame("quiet-1", 2)) == [RECEIVED, STORED]


def _upgrade(port: int) -> socket.socket:
    """A raw WebSocket client that completes the handshake and then never reads nor answers."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _frames_until_closed(sock: socket.socket, limit: float) -> tuple[list[int], float]:
    """Opcodes of the server's frames until it hangs up (or ``limit`` s), and when that was."""
    started = time.monotonic()
    sock.settimeout(limit)
    data = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    ended = time.monotonic() - started
    opcodes = []
    while len(data) >= 2:
        length = data[1] & 0x7F
        opcodes.append(data[0] & 0x0F)
        data = data[2 + length:]
    return opcodes, ended


async def test_a_device_that_does_not_answer_pings_is_closed(
        redis_url: str, processes: Processes, tmp_path: Path) -> None:
    _, port = processes.gateway(redis_url, tmp_path / "data", env=ENV)
    sock = await asyncio.to_thread(_upgrade, port)
    try:
        opcodes, ended = await asyncio.to_thread(_frames_until_closed, sock, 20 * PING_INTERVAL)
    finally:
        sock.close()
    # A ping (0x9), then, unanswered, a close frame (0x8), then the hang-up.
    assert opcodes[:1] == [0x9] and opcodes[-1] == 0x8, opcodes
    assert opcodes.count(0x9) == 1, opcodes
    assert ended < 10 * PING_INTERVAL, ended
