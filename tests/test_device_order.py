"""A device's records in the order it sent them, whatever the number of workers and their kills.

One queue (a stream, or the legacy list) drained by 2 or 4 worker processes into SQLite or
PostgreSQL, devices sending numbered records (``seq``), with and without ``kill -9`` of the
worker that drains.  Every reader must list each device's records in sent order: the store
order (``seq``), the daily files, ``fleetlog logs DEVICE --follow``, the reading API's follow
over the whole fleet, the API's live tail (``/api/stream``) and its pages
(``/api/devices/{id}/logs``, newest first, reversed).

Real processes throughout: gateway, workers, API, ``fleetlog simulate`` (v2 frames) or legacy
devices over WebSocket, one Redis, a real SQLite file or PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
import websockets

from fleetlog import keys
from fleetlog.api.auth import OperatorTokens
from fleetlog.embedded import free_port
from fleetlog.reading import LogsRequest, Reader
from fleetlog.simulate import device_ids
from tests.conftest import Processes, wait_for_port
from tests.helpers import STORED, file_lines, read_only, send_legacy, wait_until

pytestmark = pytest.mark.slow

DEVICES = 16
MESSAGES = 250
TOTAL = DEVICES * MESSAGES
#: Short leases, so that a killed holder's successor takes over within a second or two.
ENV = {"FLEETLOG_RATE_RECORDS": "1000000", "FLEETLOG_RATE_BYTES": "1000000000",
       "FLEETLOG_SHARD_LEASE": "1.5"}
#: The followers: ``fleetlog logs DEVICE --follow`` processes, one per device named here.
FOLLOWED = 2


@dataclass
class Fleet:
    """One gateway, the workers, the readers; what they saw."""

    processes: Processes
    redis_url: str
    data_dir: Path
    store_url: str
    queue: str
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    restarts: int = 0

    @property
    def lease_key(self) -> str:
        return keys.LEGACY_LEASE if self.queue == "list" else keys.shard_lease(
            "fleetlog:records", 0, 1)

    def start_worker(self, name: str) -> None:
        self.workers[name] = self.processes.start(
            "worker", "--redis-url", self.redis_url, "--data-dir", str(self.data_dir),
            "--store", self.store_url, "--files", str(self.data_dir / "logs"),
            "--queue", self.queue, "--consumer", name, "--batch", "100", "--claim-idle", "1",
            log_name=f"worker-{name}", env=ENV)

    def holder(self, client: redis.Redis) -> str | None:
        value = client.get(self.lease_key)
        return value.decode() if value else None

    def stored_seqs(self) -> list[tuple[str, int]]:
        """(device, sent seq) of every stored record, in store order (``seq``)."""
        rows: list[tuple[str, Any]]
        if self.store_url.startswith("sqlite"):
            try:
                db = read_only(self.data_dir, timeout=30)
            except sqlite3.OperationalError:
                return []
            try:
                rows = db.execute("SELECT device_id, data FROM records ORDER BY seq").fetchall()
            except sqlite3.OperationalError:
                return []
            finally:
                db.close()
        else:
            try:
                with psycopg.connect(self.store_url, connect_timeout=5) as conn:
                    rows = conn.execute("SELECT device_id, data FROM records ORDER BY seq").fetchall()
            except psycopg.Error:
                return []
        return [(device, json.loads(data)["seq"]) for device, data in rows]


def out_of_order(pairs: list[tuple[str, int]]) -> int:
    """How many records come after a record of the same device that was sent later."""
    highest: dict[str, int] = {}
    late = 0
    for device, seq in pairs:
        if seq < highest.get(device, -1):
            late += 1
        highest[device] = max(seq, highest.get(device, -1))
    return late


def per_device(pairs: list[tuple[str, int]]) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}
    for device, seq in pairs:
        seen.setdefault(device, []).append(seq)
    return seen


def check_in_sent_order(reader: str, pairs: list[tuple[str, int]], devices: list[str]) -> None:
    """Every device's records exactly once and in sent order."""
    late = out_of_order(pairs)
    seen = per_device(pairs)
    wrong = [device for device in devices if seen.get(device) != list(range(MESSAGES))]
    assert late == 0 and not wrong, (
        f"{reader}: {late} records out of sent order; devices not 0..{MESSAGES - 1} once in "
        f"order: {wrong[:5]} (of {len(wrong)})")


# -- the devices ----------------------------------------------------------------------


def simulate(port: int, prefix: str, rate: int, tmp_path: Path) -> subprocess.Popen[bytes]:
    """``fleetlog simulate``: v2 frames of 5 numbered records, each frame after the last's ack."""
    return subprocess.Popen(
        [sys.executable, "-m", "fleetlog", "simulate", "--url", f"ws://127.0.0.1:{port}",
         "--devices", str(DEVICES), "--messages", str(MESSAGES), "--batch", "5", "--rate", str(rate),
         "--prefix", prefix, "--json", "--timeout", "120"],
        stdout=(tmp_path / "simulate.json").open("wb"), stderr=subprocess.DEVNULL)


async def _legacy_device(url: str, device: str, pause: float) -> None:
    """Legacy frames ``{"deviceId", "seq"}`` one after the other, each resent until stored."""
    async with websockets.connect(url) as ws:
        for seq in range(MESSAGES):
            frame = json.dumps({"deviceId": device, "type": 4,
                                "data": {"deviceId": device, "seq": seq, "msg": f"record {seq}"}})
            for _attempt in range(50):
                if (await send_legacy(ws, frame))[1] == STORED:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"{device} record {seq} never stored")
            if pause:
                await asyncio.sleep(pause)


def send_legacy_fleet(port: int, devices: list[str], rate: int) -> threading.Thread:
    pause = DEVICES / rate if rate else 0.0
    url = f"ws://127.0.0.1:{port}"

    async def fleet() -> None:
        await asyncio.gather(*(_legacy_device(url, device, pause) for device in devices))

    thread = threading.Thread(target=asyncio.run, args=(fleet(),), daemon=True)
    thread.start()
    return thread


# -- the readers ----------------------------------------------------------------------


class Collector(threading.Thread):
    """Runs ``read(stop, add)`` in a thread until ``stop`` or TOTAL records were added."""

    def __init__(self, read: Callable[[threading.Event, Callable[[str, int], None]], None]) -> None:
        super().__init__(daemon=True)
        self._read = read
        self.stop = threading.Event()
        self.pairs: list[tuple[str, int]] = []
        self.error: BaseException | None = None

    def add(self, device: str, seq: int) -> None:
        self.pairs.append((device, seq))
        if len(self.pairs) >= TOTAL:
            self.stop.set()

    def run(self) -> None:
        try:
            self._read(self.stop, self.add)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def finish(self, timeout: float) -> list[tuple[str, int]]:
        wait_until(lambda: len(self.pairs) >= TOTAL or self.error is not None, timeout)
        self.stop.set()
        self.join(25)
        assert self.error is None, self.error
        return list(self.pairs)


def fleet_follow(store_url: str) -> Collector:
    """The reading API's follow (what ``logs --follow`` runs) over the whole fleet, from now."""

    def read(stop: threading.Event, add: Callable[[str, int], None]) -> None:
        with Reader.open(store_url) as reader:
            after = reader.position()
            for record in reader.follow(LogsRequest(None), after, poll=0.05, stop=stop):
                add(record.device_id, json.loads(record.data)["seq"])

    return Collector(read)


def live_tail(api_url: str, token: str) -> Collector:
    """``GET /api/stream`` for the whole fleet; started (its cursor taken) before returning."""
    opened = threading.Event()

    def read(stop: threading.Event, add: Callable[[str, int], None]) -> None:
        with httpx.stream("GET", f"{api_url}/api/stream", headers={"Authorization": f"Bearer {token}"},
                          timeout=httpx.Timeout(10, read=20)) as answer:
            assert answer.status_code == 200, answer.read()
            opened.set()
            for line in answer.iter_lines():
                if line.startswith("data: "):
                    record = json.loads(line[6:])
                    add(record["device_id"], record["data"]["seq"])
                if stop.is_set():
                    return

    collector = Collector(read)
    collector.start()
    assert wait_until(lambda: opened.is_set() or collector.error is not None, 30), (
        "the live tail did not open")
    assert collector.error is None, collector.error
    return collector


def api_pages(api_url: str, token: str, device: str) -> list[tuple[str, int]]:
    """One device's records through the pages (newest first), reversed to sent order."""
    newest_first: list[tuple[str, int]] = []
    cursor = None
    for _ in range(MESSAGES // 40 + 5):  # bounded: 40 a page
        params: dict[str, Any] = {"limit": 40, **({"cursor": cursor} if cursor else {})}
        answer = httpx.get(f"{api_url}/api/devices/{device}/logs", params=params, timeout=20,
                           headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.text
        page = answer.json()
        newest_first += [(r["device_id"], r["data"]["seq"]) for r in page["records"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    return newest_first[::-1]


def log_of(processes: Processes, process: subprocess.Popen[bytes]) -> Path:
    """The file a process started by ``processes`` writes its output to."""
    index = processes.started.index(process)
    return next(processes.tmp_path.glob(f"*-{index}.log"))


def follow_lines(path: Path) -> list[tuple[str, int]]:
    """(device, sent seq) of each JSON line ``logs --json --follow`` printed (stderr's line skipped)."""
    pairs = []
    for raw in path.read_bytes().splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and isinstance(line.get("data"), dict):
            pairs.append((line["device_id"], line["data"]["seq"]))
    return pairs


# -- the scenarios --------------------------------------------------------------------


CASES = [
    # queue, workers, kill -9 of the draining worker, store
    ("stream", 2, False, "postgresql"),
    ("stream", 2, True, "sqlite"),
    ("stream", 4, False, "sqlite"),
    ("stream", 4, True, "postgresql"),
    ("list", 2, False, "sqlite"),
    ("list", 2, True, "postgresql"),
    ("list", 4, False, "postgresql"),
    ("list", 4, True, "sqlite"),
]


@pytest.mark.parametrize(("queue", "workers", "kills", "store"), CASES,
                         ids=[f"{q}-{w}workers-{'kills' if k else 'nofaults'}-{s}"
                              for q, w, k, s in CASES])
def test_each_device_in_sent_order_through_every_reader(
        queue: str, workers: int, kills: bool, store: str, request: pytest.FixtureRequest,
        processes: Processes, redis_url: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    store_url = (str(request.getfixturevalue("pg_url")) if store == "postgresql"
                 else f"sqlite:///{data_dir / 'fleetlog.db'}")
    fleet = Fleet(processes, redis_url, data_dir, store_url, queue)
    client = redis.Redis.from_url(redis_url)
    try:
        _, port = processes.gateway(redis_url, data_dir, "--queue", queue, env=ENV)
        for n in range(workers):
            fleet.start_worker(f"w{n}")
        # Readers open the store read-only: wait until the workers created it.
        assert wait_until(lambda: all("worker draining" in log_of(processes, worker).read_text()
                                      for worker in fleet.workers.values()), 30)
        assert wait_until(lambda: fleet.holder(client) is not None, 15), "nobody drains"

        tokens = OperatorTokens(client)
        token = tokens.add("viewer", "read")
        api_port = free_port()
        api = processes.start("api", "--redis-url", redis_url, "--data-dir", str(data_dir),
                              "--store", store_url, "--port", str(api_port))
        wait_for_port(api_port, process=api)
        api_url = f"http://127.0.0.1:{api_port}"

        prefix = f"{queue[0]}{workers}-"
        devices = device_ids(prefix, DEVICES) if queue == "stream" else [
            f"{prefix}{n:04d}" for n in range(DEVICES)]
        followers = {}
        for device in devices[:FOLLOWED]:
            followers[device] = processes.start(
                "logs", device, "--follow", "--json", "--store", store_url,
                "--data-dir", str(data_dir), log_name=f"follow-{device}")
        follow = fleet_follow(store_url)
        follow.start()
        tail = live_tail(api_url, token)

        rate = 800 if kills else 0
        if queue == "stream":
            sender: subprocess.Popen[bytes] | threading.Thread = simulate(port, prefix, rate, tmp_path)
        else:
            sender = send_legacy_fleet(port, devices, rate)

        killed_mid_drain = 0
        if kills:
            for k in range(3):
                time.sleep(1.2)
                holder = fleet.holder(client)
                victim = fleet.workers.get(holder or "")
                if victim is None or victim.poll() is not None:
                    continue
                if len(fleet.stored_seqs()) < TOTAL:
                    killed_mid_drain += 1
                victim.send_signal(signal.SIGKILL)
                victim.wait(10)
                # Restarted: under its own name every other time (a restart in place), else a new one.
                fleet.start_worker(holder if k % 2 else f"{holder}-r{k}")  # type: ignore[arg-type]
            assert killed_mid_drain >= 1, "no kill happened while records were being drained"

        if isinstance(sender, subprocess.Popen):
            assert sender.wait(150) == 0
            summary = json.loads((tmp_path / "simulate.json").read_text())
            assert summary["acked"] == TOTAL, summary
        else:
            sender.join(150)
            assert not sender.is_alive(), "the legacy devices did not finish"

        assert wait_until(lambda: len(fleet.stored_seqs()) >= TOTAL, 120), len(fleet.stored_seqs())
        check_in_sent_order("store order (seq)", fleet.stored_seqs(), devices)

        assert wait_until(lambda: len(file_lines(data_dir)) >= TOTAL, 30)
        check_in_sent_order("daily files", [(line["device_id"], line["data"]["seq"])
                                            for line in file_lines(data_dir)], devices)

        check_in_sent_order("reading API follow (fleet)", follow.finish(30), devices)
        check_in_sent_order("API live tail /api/stream", tail.finish(30), devices)

        for device, process in followers.items():
            output = log_of(processes, process)
            assert wait_until(lambda path=output: len(follow_lines(path)) >= MESSAGES, 30), (
                len(follow_lines(output)))
            process.send_signal(signal.SIGINT)
            process.wait(10)
            pairs = follow_lines(output)
            assert {name for name, _ in pairs} == {device}
            assert out_of_order(pairs) == 0 and [s for _, s in pairs] == list(range(MESSAGES)), (
                f"logs {device} --follow: {out_of_order(pairs)} out of sent order")

        for device in devices:
            pairs = api_pages(api_url, token, device)
            assert [s for _, s in pairs] == list(range(MESSAGES)), (
                f"pages of {device}: {out_of_order(pairs)} out of sent order")
    finally:
        client.close()
        processes.stop_all()  # before the database is dropped under the workers

