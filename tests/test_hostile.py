"""Hostile input against a real gateway while a well-behaved device keeps sending.

Property-based and fuzzed frames (hypothesis), frames over the limit, binary and
invalid UTF-8 frames, slow handshakes, hundreds of unauthenticated connections and
a flood from one device.  Afterwards: the gateway is up, its memory bounded, every
hostile frame got a documented reply, and every record of the good device was
acked and stored exactly once.

Counts of what was tried are appended to ``$FLEETLOG_HOSTILE_REPORT`` when set.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from fleetlog.credentials import Credentials
from fleetlog.embedded import RedisServer
from tests.conftest import Processes, wait_for_port
from tests.helpers import RECEIVED, STORED, stored_rows, wait_until

CODES = {"bad_json", "bad_frame", "too_large", "unauthorized", "forbidden", "rate_limited",
         "busy", "unavailable"}
MAX_FRAME = 256 * 1024
TRIED: Counter[str] = Counter()


class Fleet:
    def __init__(self, url: str, data_dir: Path, redis_url: str, pid: int) -> None:
        self.url = url
        self.data_dir = data_dir
        self.redis_url = redis_url
        self.pid = pid
        client = redis.Redis.from_url(redis_url)
        credentials = Credentials(client)
        self.tokens = {name: credentials.add(name) for name in ("good", "evil", "flood")}
        client.close()
        time.sleep(0.8)

    def connect(self, device: str) -> ClientConnection:
        return connect(f"{self.url}/?token={self.tokens[device]}", max_size=None, open_timeout=10)

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Fleet]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    tmp = tmp_path_factory.mktemp("hostile")
    procs = Processes(tmp)
    env = {"FLEETLOG_HANDSHAKE_TIMEOUT": "2", "FLEETLOG_RATE_RECORDS": "1000000",
           "FLEETLOG_RATE_BYTES": "1000000000"}
    process, port = procs.gateway(redis_server.url, tmp, "--max-frame-bytes", str(MAX_FRAME),
                                  auth="token", env=env)
    procs.worker(redis_server.url, tmp)
    yield Fleet(f"ws://127.0.0.1:{port}", tmp, redis_server.url, process.pid)
    procs.stop_all()
    report = os.environ.get("FLEETLOG_HOSTILE_REPORT")
    if report:
        with open(report, "a") as handle:
            handle.write(json.dumps(dict(TRIED)) + "\n")


class GoodDevice(threading.Thread):
    """Sends legacy frames one after another until told to stop; records what was acked."""

    def __init__(self, fleet: Fleet) -> None:
        super().__init__(daemon=True)
        self.fleet = fleet
        self.stop = threading.Event()
        self.acked: list[int] = []
        self.failures: list[str] = []

    def run(self) -> None:
        with self.fleet.connect("good") as ws:
            seq = 0
            while not self.stop.is_set() and seq < 200_000:
                ws.send(json.dumps({"deviceId": "good", "type": 4, "data": {"seq": seq}}))
                replies = [ws.recv(timeout=10), ws.recv(timeout=10)]
                if replies == [RECEIVED, STORED]:
                    self.acked.append(seq)
                else:
                    self.failures.append(repr(replies))
                seq += 1
                time.sleep(0.002)


@pytest.fixture(scope="module")
def good_device(fleet: Fleet) -> Iterator[GoodDevice]:
    device = GoodDevice(fleet)
    device.start()
    yield device
    device.stop.set()
    device.join(30)


def _replies_until_marker(ws: ClientConnection, marker: str) -> list[Any]:
    replies = []
    while True:
        raw = ws.recv(timeout=10)
        reply = raw if raw in (RECEIVED, STORED) else json.loads(raw)
        if isinstance(reply, dict) and reply.get("type") == "ack" and reply.get("id") == marker:
            return replies
        replies.append(reply)


def _documented(reply: Any) -> bool:
    if reply in (RECEIVED, STORED):
        return True
    if not isinstance(reply, dict):
        return False
    if reply.get("type") == "error":
        return reply.get("code") in CODES and isinstance(reply.get("message"), str)
    return reply.get("type") == "ack" and "id" in reply and isinstance(reply.get("stored"), int)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children,
                                                                      max_size=5),
    max_leaves=25,
)
legacy_like = st.fixed_dictionaries(
    {"type": st.sampled_from([4, "4", 1, 5, None, "log", 4.0])},
    optional={"deviceId": st.one_of(st.just("evil"), st.just("good"), st.integers(), json_values),
              "data": json_values},
)
v2_like = st.fixed_dictionaries(
    {"type": st.just("log")},
    optional={"id": st.one_of(st.text(max_size=200), st.integers(), json_values),
              "records": st.one_of(st.lists(json_values, max_size=40), json_values),
              "session": st.one_of(st.text(max_size=80), json_values),
              "deviceId": st.one_of(st.just("evil"), st.just("other"), json_values)},
)


frames = st.one_of(
    json_values.map(lambda v: ("random_json", json.dumps(v).encode())),
    legacy_like.map(lambda v: ("legacy_like", json.dumps(v).encode())),
    v2_like.map(lambda v: ("v2_like", json.dumps(v).encode())),
    st.binary(max_size=300).map(lambda b: ("raw_bytes_as_text", b)),
    st.integers(1, 60_000).map(lambda n: ("deep_nesting", b"[" * n + b"]" * n)),
    st.integers(19, 5000).map(
        lambda n: ("huge_number", b'{"deviceId":"evil","type":4,"data":' + b"9" * n + b"}")),
    st.integers(1, 200_000).map(
        lambda n: ("huge_string", b'{"type":4,"data":"' + b"x" * n + b'"}')),
    st.text(max_size=500).map(lambda t: ("random_text", t.encode())),
)


def test_fuzzed_frames_get_documented_replies(fleet: Fleet, good_device: GoodDevice) -> None:
    markers = iter(range(10**9))
    rss_before = fleet.rss()

    @settings(max_examples=int(os.environ.get("FLEETLOG_HOSTILE_EXAMPLES", "300")), deadline=None,
              suppress_health_check=list(HealthCheck), derandomize=False, database=None)
    @given(batch=st.lists(frames, min_size=1, max_size=10))
    def run(batch: list[tuple[str, bytes]]) -> None:
        for kind, payload in batch:
            TRIED[kind] += 1
            ws.send(payload, text=True)
            marker = f"m{next(markers)}"
            ws.send(json.dumps({"type": "log", "id": marker, "records": [{"marker": marker}]}))
            replies = _replies_until_marker(ws, marker)
            assert replies, f"{kind}: no reply at all"
            assert all(_documented(reply) for reply in replies), f"{kind}: {replies!r}"

    with fleet.connect("evil") as ws:
        run()
    assert fleet.rss() - rss_before < 100 * 1024 * 1024, "gateway memory stays bounded"


def test_binary_and_oversized_frames(fleet: Fleet) -> None:
    with fleet.connect("evil") as ws:
        for _ in range(50):
            TRIED["binary"] += 1
            ws.send(b'{"type":4,"data":1}')
            assert ws.recv(timeout=5) == RECEIVED
            assert json.loads(ws.recv(timeout=5))["code"] == "bad_frame"
    for _ in range(20):
        TRIED["over_limit"] += 1
        with fleet.connect("evil") as ws:
            ws.send("x" * (MAX_FRAME + 1))
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.recv(timeout=5)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1009


def test_slow_handshakes_and_unauthenticated_crowds(fleet: Fleet) -> None:
    port = int(fleet.url.rsplit(":", 1)[1])
    slow = []
    for _ in range(200):
        TRIED["slow_handshake"] += 1
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # ... and never finishes
        slow.append(sock)
    statuses: Counter[int] = Counter()
    for n in range(300):
        TRIED["unauthenticated"] += 1
        suffix = "" if n % 2 else "/?token=flt_forged"
        try:
            with connect(f"{fleet.url}{suffix}", open_timeout=10):
                statuses[101] += 1
        except InvalidStatus as exc:
            statuses[exc.response.status_code] += 1
    assert statuses == {401: 300}
    started = time.monotonic()
    for sock in slow:  # the handshake timeout (2 s here) answers every one of them 408, then closes
        sock.settimeout(max(0.1, 10 - (time.monotonic() - started)))
        answer = b""
        try:
            while chunk := sock.recv(1024):
                answer += chunk
        except ConnectionResetError:
            pass  # closed hard: just as gone
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer[:100]
        sock.close()
    assert time.monotonic() - started < 10
    wait_for_port(port)


def test_flood_from_one_device(fleet: Fleet) -> None:
    """A device that never waits for acks: slowed by TCP backpressure, the rest unharmed."""
    rss_before = fleet.rss()
    frame = json.dumps({"type": "log", "id": "x", "records": [{"flood": "y" * 100}] * 100})
    deadline = time.monotonic() + 5
    sent = 0
    with fleet.connect("flood") as ws:
        def sender() -> None:
            nonlocal sent
            try:
                while time.monotonic() < deadline and sent < 20_000:
                    ws.send(frame)
                    sent += 1
            except ConnectionClosed:
                pass

        thread = threading.Thread(target=sender, daemon=True)
        thread.start()
        thread.join(15)
    TRIED["flood_frames"] += sent
    assert sent > 0
    assert fleet.rss() - rss_before < 200 * 1024 * 1024, "gateway memory stays bounded"


def test_good_device_unharmed(fleet: Fleet, good_device: GoodDevice) -> None:
    """Runs last in this module: everything the good device sent was acked and stored once."""
    time.sleep(0.5)
    good_device.stop.set()
    good_device.join(30)
    assert good_device.failures == []
    assert len(good_device.acked) > 100
    TRIED["good_device_frames"] += len(good_device.acked)

    def good_rows() -> list[int]:
        return [seq for _, device, seq, _ in stored_rows(fleet.data_dir) if device == "good"]

    assert wait_until(lambda: len(good_rows()) >= len(good_device.acked), timeout=60)
    assert sorted(good_rows()) == good_device.acked
