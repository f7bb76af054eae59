"""Gateway limits against a real gateway, worker and Redis: a refused message reaches nothing.

A limit is only a limit if what it refused is absent from Redis and the store
afterwards, so every test here checks both the reply (close code, HTTP status)
and what the stream and the SQLite store hold.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import websockets

from tests.conftest import Processes
from tests.helpers import RECEIVED, STORED, legacy_frame, queued, send_legacy, stored_rows, wait_until

MiB = 1024 * 1024
STREAM = "fleetlog:records"


async def _expect_close(ws: websockets.ClientConnection) -> int:
    """Read until the gateway closes the connection; its close code."""
    with pytest.raises(websockets.ConnectionClosed) as closed:
        for _ in range(10):
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None, "the gateway sent a close frame"
    return closed.value.rcvd.code


def _chunks(text: str, size: int) -> Iterator[str]:
    for start in range(0, len(text), size):
        yield text[start:start + size]


def _masked_frame(first_byte: int, payload: bytes) -> bytes:
    """One client frame written by hand, for what a WebSocket library will not send."""
    assert len(payload) < 126
    mask = b"\x01\x02\x03\x04"
    masked = bytes(byte ^ mask[n % 4] for n, byte in enumerate(payload))
    return bytes([first_byte, 0x80 | len(payload)]) + mask + masked


async def test_over_limit_messages_are_refused_however_framed(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    """A 2 MiB legacy record over the 1 MiB limit: 1009, and never queued or stored.

    Also a frame marked compressed, which the gateway never negotiated: 1002, not stored.

    picows closes with 1009 as soon as it reads the header of a frame over
    ``max_frame_size``, but its parser kept going and delivered the whole frame
    to the gateway once it had arrived, which queued it.
    """
    data_dir = tmp_path / "data"
    _, port = processes.gateway(redis_url, data_dir)  # max_frame_bytes: 1 MiB by default
    processes.worker(redis_url, data_dir)
    url = f"ws://127.0.0.1:{port}"
    big = legacy_frame("big", 0, blob="x" * (2 * MiB))

    # One unfragmented text frame.
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        await ws.send(big)
        assert await _expect_close(ws) == 1009
    # The same message in 64 KiB fragments: the limit counts the whole message.
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        await ws.send(_chunks(legacy_frame("big", 1, blob="x" * (2 * MiB)), 64 * 1024))
        assert await _expect_close(ws) == 1009
    # Fragments each under the limit, a message over it, sent at once.
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        await ws.send(_chunks(legacy_frame("big", 2, blob="x" * (MiB + 10)), MiB - 10))
        assert await _expect_close(ws) == 1009

    # A frame marked compressed (RSV1) though no compression was negotiated: 1002.
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        ws.transport.write(_masked_frame(0x80 | 0x40 | 0x1, legacy_frame("deflated", 0).encode()))
        assert await _expect_close(ws) == 1002

    # A record within the limit still goes through, and is the only one stored.
    async with websockets.connect(url, max_size=None) as ws:
        assert await send_legacy(ws, legacy_frame("small", 0, blob="y" * 1000)) == [RECEIVED, STORED]
    assert wait_until(lambda: len(stored_rows(data_dir)) >= 1, timeout=20)
    await asyncio.sleep(1.0)  # time for anything wrongly queued to be stored too
    assert [(device, seq) for _, device, seq, _ in stored_rows(data_dir)] == [("small", 0)]
    client = redis.Redis.from_url(redis_url)
    try:
        # The worker trims what it stored: count what was ever added instead.
        assert client.xinfo_stream(STREAM)["entries-added"] == 1, "nothing else reached the stream"
    finally:
        client.close()


def _raw_request(port: int, request: bytes) -> bytes:
    """Send raw bytes to the gateway; everything it answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(request)
        except OSError:
            pass  # the gateway may close before it has read everything; its answer still counts
        answer = b""
        for _ in range(100):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
        return answer


def test_request_headers_over_the_limit_get_431(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    """A 64 KiB header: ``431 Request Header Fields Too Large``, not a silent reset."""
    _, port = processes.gateway(redis_url, tmp_path / "data")
    huge = b"X-Padding: " + b"a" * (64 * 1024) + b"\r\n"
    answer = _raw_request(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + huge + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    # Headers that never end (no blank line) are answered the same way.
    answer = _raw_request(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + huge)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    # A request within the limit still works.
    answer = _raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["status"] == "ok"


async def test_replies_keep_frame_order_through_a_rate_limit_delay(
    redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    """A message read while an earlier frame waits out its rate-limit delay is answered after it.

    The error for a binary message sent during the delay used to go out at
    once, ahead of the delayed frame's ack.
    """
    _, port = processes.gateway(redis_url, tmp_path / "data", "--rate-records", "20",
                                env={"FLEETLOG_RATE_BURST": "1", "FLEETLOG_RATE_MAX_DELAY": "5"})
    device = "ordered-through-delay"

    def log(frame_id: str, count: int) -> str:
        return json.dumps({"type": "log", "id": frame_id, "deviceId": device,
                           "records": [{"n": n} for n in range(count)]})

    def _client_frame(first_byte: int, payload: bytes) -> bytes:
        """A final masked client frame of up to 64 KiB (mask of zeros: the payload as is)."""
        assert len(payload) < 1 << 16
        length = (bytes([0x80 | len(payload)]) if len(payload) < 126
                  else bytes([0x80 | 126]) + len(payload).to_bytes(2, "big"))
        return bytes([first_byte]) + length + b"\0\0\0\0" + payload

    async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        await ws.send(log("burst", 20))  # the whole burst: through at once
        # In one write, so the gateway reads both before it pauses reading:
        # 0.5 s of debt (slowed, not refused), then a binary message.
        ws.transport.write(_client_frame(0x81, log("slowed", 10).encode())
                           + _client_frame(0x82, b"\x00binary"))
        replies = [await asyncio.wait_for(ws.recv(), 10) for _ in range(4)]
    said = [reply if reply == RECEIVED else json.loads(reply).get("id") or json.loads(reply)["code"]
            for reply in replies]
    assert said == ["burst", "slowed", RECEIVED, "bad_frame"]
    client = redis.Redis.from_url(redis_url)
    try:
        entries = queued(client, STREAM)
    finally:
        client.close()
    assert sum(1 for queued_device, _ in entries if queued_device == device.encode()) == 30
