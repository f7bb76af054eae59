"""Issue 17: one search cannot take the API, forged input is a 4xx, the CSV export is safe in a
spreadsheet, command bodies are bounded, and the small things (exit codes, 422 fields, redirects).

Real API processes (psutil watches their CPU), a real Redis, a real SQLite file and a real
PostgreSQL; raw sockets for the requests no well-behaved client sends.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import pytest
import redis
import websockets

from fleetlog import keys
from fleetlog.embedded import free_port
from fleetlog.reading import MAX_Q
from fleetlog.records import QueuedRecord
from fleetlog.store import open_store
from tests.api.conftest import Api
from tests.conftest import Processes, wait_for_port
from tests.helpers import RECEIVED, legacy_frame, send_legacy, wait_until

pytestmark = pytest.mark.slow

T0 = int(time.time() * 1000) - 600_000
FORGED_CURSORS = ("OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTkuMQ", "MTc5NjQwMzMzMDQxMy45OTk5OTk5OTk5OTk5OTk5OTk5OQ")


def start_api(api: Api, processes: Processes, *extra: str, **env: str) -> tuple[str, psutil.Process]:
    """Another API process on the fixture's Redis and data dir (``env``: FLEETLOG_* settings)."""
    port = free_port()
    process = processes.start("api", "--redis-url", api.redis_url, "--data-dir", str(api.data_dir),
                              "--port", str(port), *extra, env=env)
    wait_for_port(port, process=process)
    return f"http://127.0.0.1:{port}", psutil.Process(process.pid)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def write(store_url: str, records: list[QueuedRecord], *, index: bool = True) -> None:
    store = open_store(store_url)
    store.write_batch(records)
    while index and store.upkeep(10_000):
        pass
    store.close()


def sqlite_url(api: Api) -> str:
    return f"sqlite:///{api.data_dir / 'fleetlog.db'}"


def idle(process: psutil.Process, within: float = 5.0) -> float:
    """The lowest CPU share (percent of one core) over 1 s windows, until one is under 10%."""
    deadline = time.monotonic() + within
    lowest = process.cpu_percent(interval=1.0)
    while lowest >= 10 and time.monotonic() < deadline:
        lowest = min(lowest, process.cpu_percent(interval=1.0))
    return lowest


# -- 2. one search cannot take the API ---------------------------------------------------


def test_a_search_repeating_one_trigram_answers_at_once_and_leaves_the_api_idle(
        api: Api, processes: Processes) -> None:
    """8 records of 300,000 ``a``: q = 1,000 ``a`` took 13 s, 10,000 ``a`` over 6 minutes."""
    write(sqlite_url(api), [QueuedRecord(f"1-{n}", "aaa", T0 + n, orjson.dumps({"msg": "a" * 300_000}))
                            for n in range(8)])
    url, process = start_api(api, processes)
    with httpx.Client(base_url=url, headers=auth(api.reader), timeout=30) as http:
        for length in (1000, 2000, 10_000):
            started = time.monotonic()
            answer = http.get("/api/logs", params={"q": "a" * length, "limit": 10})
            assert answer.status_code == 422, answer.text
            assert answer.json()["detail"][0]["loc"] == ["query", "q"]
            assert time.monotonic() - started < 2
        for path in ("/api/logs", "/api/devices/aaa/logs"):
            started = time.monotonic()
            answer = http.get(path, params={"q": "a" * MAX_Q, "limit": 10})
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["records"]) == 8
            assert time.monotonic() - started < 3
        export = http.get("/api/export", params={"q": "A" * MAX_Q})
        assert export.status_code == 200 and len(export.text.splitlines()) == 8
    assert idle(process) < 10


@pytest.fixture
def slow_store(api: Api) -> Api:
    """200 records whose search text is costly, not indexed yet: q=zzz scans them, ~5 s of CPU."""
    body = orjson.dumps({"n": [1] * 100_000})
    write(sqlite_url(api), [QueuedRecord(f"1-{n}", "slow", T0 + n, body) for n in range(200)], index=False)
    return api


def test_a_read_past_its_budget_is_a_503_saying_narrow_the_search(
        slow_store: Api, processes: Processes) -> None:
    url, process = start_api(slow_store, processes, FLEETLOG_READ_TIMEOUT="0.5")
    with httpx.Client(base_url=url, headers=auth(slow_store.reader), timeout=30) as http:
        for path, params in (("/api/logs", {}), ("/api/devices/slow/logs", {}),
                             ("/api/export", {"format": "csv"})):
            started = time.monotonic()
            answer = http.get(path, params={"q": "zzz", **params})
            assert answer.status_code == 503, answer.text
            assert "narrow the search" in answer.json()["detail"]
            assert time.monotonic() - started < 2.5
        assert http.get("/api/devices/slow/logs", params={"limit": 3}).status_code == 200
    assert idle(process) < 10


def test_a_read_stops_when_its_client_goes_and_other_requests_answer_meanwhile(
        slow_store: Api, processes: Processes) -> None:
    url, process = start_api(slow_store, processes, FLEETLOG_READ_TIMEOUT="120")
    headers = auth(slow_store.reader)
    answered: list[int] = []
    took: list[float] = []

    def search() -> None:  # runs to its end (~5 s): meanwhile the API answers the rest
        started = time.monotonic()
        answered.append(httpx.get(f"{url}/api/logs", params={"q": "zzz"}, headers=headers,
                                  timeout=60).status_code)
        took.append(time.monotonic() - started)

    searching = threading.Thread(target=search)
    searching.start()
    time.sleep(0.5)
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        for path in ("/healthz", "/api/devices", "/api/devices/slow/logs", "/api/stats/volume"):
            started = time.monotonic()
            assert http.get(path, params={"limit": 1} if "logs" in path else {}).status_code == 200
            assert time.monotonic() - started < 1.5, path
    assert searching.is_alive(), "the search was over before the others were asked"
    searching.join(60)
    assert answered == [200] and took[0] > 2, took  # long enough for what follows to tell
    # A client that gives up: its read stops with it (it used to run on to the end).
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{url}/api/logs", params={"q": "zzz"}, headers=headers, timeout=0.5)
    time.sleep(0.3)  # the next second is one the search (over 2 s) would still have run in
    assert process.cpu_percent(interval=1.0) < 10


# -- 3. forged input is a 4xx ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_forged_input_is_a_4xx(api: Api, processes: Processes, backend: str, request: Any) -> None:
    store = request.getfixturevalue("pg_url") if backend == "postgresql" else sqlite_url(api)
    write(store, [QueuedRecord("1-0", "door", T0, orjson.dumps({"msg": "hello", "level": "info"}))])
    url, _ = start_api(api, processes, "--store", store)
    with httpx.Client(base_url=url, headers=auth(api.reader), timeout=30) as http:
        for cursor in FORGED_CURSORS:
            for path in ("/api/logs", "/api/devices/door/logs"):
                answer = http.get(path, params={"cursor": cursor})
                assert answer.status_code == 422, (path, answer.text)
                assert answer.json()["detail"][0]["loc"] == ["query", "cursor"]
            with http.stream("GET", "/api/stream", headers={"Last-Event-ID": cursor}) as stream:
                assert stream.status_code == 422
        volume = http.get("/api/stats/volume", params={"step": "1000w", "since": "0001-01-01T00:00:00Z"})
        assert volume.status_code == 200, volume.text
        assert sum(bucket["records"] for bucket in volume.json()["buckets"]) == 1
        for path in ("/api/logs", "/api/devices/door/logs", "/api/export"):
            answer = http.get(path, params={"q": "\x00"})
            assert answer.status_code == 422, answer.text
            assert answer.json()["detail"][0]["loc"] == ["query", "q"]
        assert http.get("/api/logs", params={"q": "hello"}).json()["records"][0]["device_id"] == "door"


# -- 5. the CSV export is safe to open in a spreadsheet ------------------------------------------

MESSAGES = ("=1+1", "+SUM(A1:A9)", "-2+3", "@cmd", "\tTAB", "\rCR first", "line\nbreak",
            "cr\ronly", "crlf\r\nboth", 'say "hi", then go', "plain", "中文=ok")


def test_csv_export_neutralises_formulas_and_keeps_one_row_per_record(api: Api) -> None:
    records = [QueuedRecord(f"1-{n}", "door", T0 + n, orjson.dumps({"msg": text}))
               for n, text in enumerate(MESSAGES)]
    records.append(QueuedRecord("2-0", "=HYPERLINK(1)", T0 + 100, b"-5"))  # a bare number record
    write(sqlite_url(api), records)
    text = httpx.get(f"{api.url}/api/export", params={"format": "csv"}, headers=auth(api.reader),
                     timeout=30).text
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert len(rows) == len(records) + 1 and rows[0][:3] == ["seq", "device_id", "received_at"]
    by_seq = {int(row[0]): row for row in rows[1:]}
    for seq, message in enumerate(MESSAGES, start=1):
        row = by_seq[seq]
        expected = "'" + message if message[0] in "=+-@\t\r" else message
        assert row[5] == expected, (message, row)
        assert orjson.loads(row[6]) == {"msg": message}  # data is JSON: a leading { needs nothing
    number = by_seq[len(MESSAGES) + 1]
    assert number[1] == "'=HYPERLINK(1)" and number[6] == "'-5"
    for row in rows[1:]:
        assert not any(cell[:1] in ("=", "+", "-", "@", "\t", "\r") for cell in row), row


# -- 6. commands are bounded ------------------------------------------------------------------


def _raw(url: str, head: str, body: bytes = b"", *, timeout: float = 10) -> tuple[bytes, float, bool]:
    """Send ``head`` (and ``body``) on a fresh socket; (what came back, seconds to the first byte,
    whether the server closed the connection within ``timeout``)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        started = time.monotonic()
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        if body:
            try:
                sock.sendall(body)
            except OSError:
                pass  # the server answered and closed before taking all of it: fine
        got, first, closed = b"", 0.0, False
        deadline = started + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            first = first or time.monotonic() - started
            got += chunk
        return got, first, closed


def _post_head(path: str, length: int, token: str | None = None) -> str:
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", "Content-Type: application/json",
             f"Content-Length: {length}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return "\n".join(lines) + "\n"


def test_command_bodies_are_bounded_authenticated_first_and_timed(api: Api, processes: Processes) -> None:
    url, _ = start_api(api, processes, FLEETLOG_BODY_TIMEOUT="1")
    path = "/api/devices/nobody/commands"
    with httpx.Client(base_url=url, headers=auth(api.admin), timeout=30) as http:
        # The default limit is 64 KiB of JSON: one byte under is read (the device is offline) ...
        fits = orjson.dumps("x" * (64 * 1024 - 2))
        answer = http.post(path, content=fits, headers={"Content-Type": "application/json"})
        assert answer.status_code == 200 and answer.json()["status"] == "offline", answer.text
        # ... one over is a 413 before a byte of it is read, and closes the connection.
        over = http.post(path, content=orjson.dumps("x" * (64 * 1024)),
                         headers={"Content-Type": "application/json"})
        assert over.status_code == 413 and "max_command_bytes" in over.json()["detail"]
        assert over.headers["connection"] == "close"

        def chunks() -> Iterator[bytes]:  # chunked: no Content-Length to go by, so counted
            yield b'"'
            for _ in range(100):
                yield b"y" * 10_000
            yield b'"'

        chunked = http.post(path, content=chunks(), headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413, chunked.text
    # 100 MB announced without a token: 401 before any of it is sent.
    got, first, closed = _raw(url, _post_head(path, 100_000_000))
    assert got.startswith(b"HTTP/1.1 401") and closed and first < 2, got[:200]
    # 100 MB announced with a token, 1 MB sent: 413 at once, and the connection is not held open.
    got, first, closed = _raw(url, _post_head(path, 100_000_000, api.admin), b"x" * 1_000_000)
    assert got.startswith(b"HTTP/1.1 413") and closed and first < 2, got[:200]
    # 60,000 bytes announced, 1,000 sent: 408 after body_timeout (1 s here), connection closed.
    got, first, closed = _raw(url, _post_head(path, 60_000, api.admin), b"x" * 1000)
    assert got.startswith(b"HTTP/1.1 408") and closed and 0.8 < first < 4, (got[:200], first)


async def test_no_control_message_breaks_a_gateways_subscription(
        api: Api, processes: Processes, tmp_path: Path) -> None:
    gateway, port = processes.gateway(api.redis_url, tmp_path / "gw")
    client = redis.Redis.from_url(api.redis_url)
    try:
        async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
            assert (await send_legacy(ws, legacy_frame("door-9", 0)))[0] == RECEIVED
            assert await asyncio.to_thread(
                wait_until, lambda: client.hexists(keys.DEVICE_LINKS, "door-9"), 10)
            node = orjson.loads(client.hget(keys.DEVICE_LINKS, "door-9") or b"{}")["node"]
            channel = keys.node_control(node)
            for junk in (b"not json", b"[1, 2]", b'"text"', b'{"op": "command"}', b"\xff\xfe",
                         orjson.dumps({"op": "command", "id": 7, "device": [], "body": 1}),
                         b'{"op": "command", "pad": "' + b"z" * (20 * 1024 * 1024) + b'"}',
                         b"x" * (40 * 1024 * 1024)):  # over Redis' 32 MB pub/sub output limit
                client.publish(channel, junk)
            async with httpx.AsyncClient(base_url=api.url, headers=auth(api.admin), timeout=30) as http:
                outcome: dict[str, Any] = {}
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # the subscription may be coming back
                    outcome = (await http.post("/api/devices/door-9/commands", json={"cmd": "ok"})).json()
                    if outcome["status"] == "delivered":
                        break
                    await asyncio.sleep(0.2)
                assert outcome["status"] == "delivered", outcome
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 10)) == {"cmd": "ok"}
    finally:
        client.close()
    assert gateway.poll() is None
    log = b"".join(path.read_bytes() for path in processes.tmp_path.glob("gateway-*.log"))
    assert b"dropping a control message of" in log and len(log) < 1_000_000  # the junk is not logged


# -- 9. the small things ------------------------------------------------------------------------


def test_small_things(api: Api) -> None:
    with httpx.Client(base_url=api.url, timeout=30) as http:
        bogus = http.get("/api/logs", params={"level": "bogus"}, headers=auth(api.reader))
        assert bogus.status_code == 422
        (problem,) = bogus.json()["detail"]
        assert problem["loc"] == ["query", "level"] and "unknown level 'bogus'" in problem["msg"]
        step = http.get("/api/stats/volume", params={"step": "1ms"}, headers=auth(api.reader))
        assert step.json()["detail"][0]["loc"] == ["query", "step"]
        for path, location in (("/metrics/", "/metrics"), ("/api/logs/?limit=1", "/api/logs?limit=1")):
            moved = http.get(path, headers={"Host": "evil.example", **auth(api.reader)})
            assert moved.status_code == 307 and moved.headers["location"] == location, moved.headers
        assert http.head("/").status_code == 200 and http.get("/").status_code == 200
        forbidden = http.post("/api/device-tokens", json={"device_id": "d"}, headers=auth(api.reader))
        assert forbidden.status_code == 403 and "viewer" not in forbidden.text
    usage = subprocess.run([sys.executable, "-m", "fleetlog", "send", "--api-url", api.url, "d", "{}",
                            "--wait", "99"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "FLEETLOG_API_TOKEN": api.admin})
    assert usage.returncode == 64 and "--wait" in usage.stderr  # a usage error; 2 is a timeout
