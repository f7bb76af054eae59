"""Small helpers shared by the end-to-end tests: a legacy device and store readers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import websockets

RECEIVED = "server receive a message!"
STORED = "log_upload_response"


async def unfinished_frame(port: int, size: int, sent: int
                           ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw WebSocket connection that sends ``sent`` bytes of a ``size``-byte text frame, and
    no more (the bytes wait in the server's read buffer until the frame is whole)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET / HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"no upgrade: {head[:80]!r}")
    writer.write(bytes([0x81, 0x80 | 127]) + struct.pack("!Q", size) + b"\0\0\0\0")
    chunk, left = b"x" * 65536, sent
    with contextlib.suppress(ConnectionError):  # the server may close it meanwhile (1008)
        while left > 0:
            writer.write(chunk[:min(left, len(chunk))])
            left -= len(chunk)
            await writer.drain()
    return reader, writer


async def closed_with(reader: asyncio.StreamReader, code: int, timeout: float) -> bool:
    """Whether the next bytes of a raw WebSocket connection are a close frame with ``code``."""
    with contextlib.suppress(TimeoutError, ConnectionError):
        data = await asyncio.wait_for(reader.read(64), timeout)
        return data[:1] == b"\x88" and len(data) >= 4 and struct.unpack("!H", data[2:4])[0] == code
    return False


def legacy_frame(device_id: str, seq: int, **data: Any) -> str:
    return json.dumps({"deviceId": device_id, "type": 4, "data": {"seq": seq, **data}})


async def send_legacy(ws: Any, frame: str, timeout: float = 10) -> list[Any]:
    """Send one legacy frame; return its replies: RECEIVED then STORED or an error dict."""
    await ws.send(frame)
    first = await asyncio.wait_for(ws.recv(), timeout)
    second = await asyncio.wait_for(ws.recv(), timeout)
    return [first, second if second in (STORED, RECEIVED) else json.loads(second)]


async def legacy_device(url: str, device_id: str, count: int) -> list[int]:
    """Send ``count`` records one after the other; return the seqs that were acked."""
    acked = []
    async with websockets.connect(url, max_size=None) as ws:
        for seq in range(count):
            replies = await send_legacy(ws, legacy_frame(device_id, seq, msg=f"record {seq}"))
            assert replies[0] == RECEIVED
            if replies[1] == STORED:
                acked.append(seq)
    return acked


def read_only(data_dir: Path, timeout: float = 5.0) -> sqlite3.Connection:
    """The store, read-only: never a file created at the path.  (A plain connect between an
    ``rm`` of the store and the worker's reopen made a new file there, applied the removed
    store's WAL to it, and the worker then wrote into that resurrected store.)"""
    return sqlite3.connect(f"file:{data_dir / 'fleetlog.db'}?mode=ro", uri=True, timeout=timeout)


def stored_count(data_dir: Path) -> int:
    """How many records the store holds: cheap enough to poll while a worker drains."""
    try:
        db = read_only(data_dir)
    except sqlite3.OperationalError:
        return 0
    try:
        return int(db.execute("SELECT count(*) FROM records").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def stored_rows(data_dir: Path) -> list[tuple[str, str, int, str]]:
    """(qid, device_id, seq, data) of every stored record, in store order."""
    try:
        db = read_only(data_dir)
    except sqlite3.OperationalError:
        return []
    try:
        rows = db.execute("SELECT qid, device_id, data FROM records ORDER BY seq").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()
    result = []
    for qid, device, data in rows:
        value = json.loads(data)
        result.append((qid, device, value.get("seq", -1) if isinstance(value, dict) else -1, data))
    return result


def file_lines(data_dir: Path) -> list[dict[str, Any]]:
    lines = []
    for path in sorted((data_dir / "logs" / "device" / "log").glob("*.log")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


def wait_until(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def run_fleetlog(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a ``fleetlog`` command as a user would; its output as text."""
    return subprocess.run([sys.executable, "-m", "fleetlog", *args], capture_output=True, text=True,
                          timeout=timeout)


def queued(client: Any, stream: str = "fleetlog:records") -> list[tuple[bytes, bytes]]:
    """(device, record) of every record in ``stream``, in queue order, packed entries unpacked."""
    from fleetlog.queue.consumer import unpack_entry

    out: list[tuple[bytes, bytes]] = []
    for _, fields in client.xrange(stream):
        unpacked = unpack_entry(fields)
        if unpacked is None:
            out.append((fields[b"d"], fields[b"r"]))
        else:
            out += [(device.encode(), record) for device, record in unpacked]
    return out


def produce(redis_url: str, submissions: list[tuple[str, list[bytes]]], stream: str = "fleetlog:records"
            ) -> None:
    """Queue ``submissions`` (device, records) through the gateway's producer in ONE call: one
    packed stream entry, as a gateway writes them in one loop turn."""
    from fleetlog.queue.connection import connect_async
    from fleetlog.queue.producer import Producer

    async def run() -> None:
        client = connect_async(redis_url)
        producer = Producer(client, mode="stream", stream=stream, max_backlog=1_000_000)
        outcomes: list[Any] = []
        for device, records in submissions:
            producer.submit(device, records, outcomes.append)
        producer.start()
        await producer.close()
        await client.aclose()
        assert len(outcomes) == len(submissions) and all(
            not isinstance(outcome, Exception) for outcome in outcomes), outcomes
        assert producer.calls == 1

    asyncio.run(run())
